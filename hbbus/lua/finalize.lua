-- Published and confirmed: drop events from the outbox. ARGV[9..] = event ids.
-- With ARGV[9] == 'release', the ids that follow were NOT published: their leases are dropped
-- so that a reaper hands them out again at once, still in order.
if ARGV[9] == 'release' then
  for i = 10, #ARGV do redis.call('HDEL', K_LEASE, ARGV[i]) end
  return 0
end
local n = 0
for i = 9, #ARGV do
  local evid = ARGV[i]
  local stored = redis.call('HGET', K_BODY, evid)
  if stored then
    local id = string.sub(stored, 1, string.find(stored, ' ', 1, true) - 1)
    if redis.call('HINCRBY', K_PENDING, id, -1) <= 0 then redis.call('HDEL', K_PENDING, id) end
    redis.call('HDEL', K_BODY, evid)
    n = n + 1
  end
  redis.call('ZREM', K_OUTBOX, evid)
  redis.call('HDEL', K_LEASE, evid)
end
return n
