-- Published and confirmed: drop events from the outbox. ARGV[S..] = event ids. Returns how
-- many of them have a later event of their instance waiting in the outbox (held back until
-- they were finalised: a reaper may hand it out now).
-- With ARGV[S] == 'release', the ids that follow were NOT published: their leases are dropped
-- so that a reaper hands them out again at once, still in order.
if ARGV[S] == 'release' then
  for i = S + 1, #ARGV do redis.call('HDEL', K_LEASE, ARGV[i]) end
  return 0
end
local waiting = 0
for i = S, #ARGV do
  local evid = ARGV[i]
  local stored = redis.call('HGET', K_BODY, evid)
  if stored then
    local id = string.sub(stored, 1, string.find(stored, ' ', 1, true) - 1)
    if redis.call('HINCRBY', K_PENDING, id, -1) <= 0 then
      redis.call('HDEL', K_PENDING, id)
    else
      waiting = waiting + 1
    end
    redis.call('HDEL', K_BODY, evid)
  end
  redis.call('ZREM', K_OUTBOX, evid)
  redis.call('HDEL', K_LEASE, evid)
end
return waiting
