-- Published (confirmed) events leave the outbox. ARGV[S..] = event ids. Returns how many of
-- them have a later event of their instance waiting in the outbox (held back until they were
-- finalised): the next one is now due, and a reaper may hand it out at once.
-- With ARGV[S] == 'release', the ids that follow were NOT published: they are due again now,
-- so that a reaper hands them out again at once, still in order.
outbox_index()
if ARGV[S] == 'release' then
  for i = S + 1, #ARGV do redis.call('ZADD', K_DUE, 'XX', 0, ARGV[i]) end
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
      local nxt = redis.call('ZPOPMIN', outbox_wait_key(id))
      if nxt[1] then
        redis.call('ZADD', K_DUE, 0, nxt[1])
      else  -- a count that says more than waits (never, unless edited by hand): the next
        redis.call('HDEL', K_PENDING, id)  -- event of the instance goes out at once
        waiting = waiting - 1
      end
    end
    redis.call('HDEL', K_BODY, evid)
  end
  redis.call('ZREM', K_OUTBOX, evid)
  redis.call('ZREM', K_DUE, evid)
end
return waiting
