-- The reaper's step. ARGV[6] = limit.
-- 1. The outbox, oldest first: an event without a live lease (its publisher died or gave up)
--    is handed out again, unless an older event of the same instance is still pending.
-- 2. Due deadlines: an alive instance past last_seen + ttl becomes dead; a dead or left record
--    past its retention is purged. A deadline that moved (a heartbeat came) is re-filed.
-- Returns {now_ms, next_deadline_ms or -1, evid, routing_key, body, ...}.
local limit = tonumber(ARGV[6])

local waiting = {}
for _, evid in ipairs(redis.call('ZRANGE', K_OUTBOX, 0, limit - 1)) do
  local stored = redis.call('HGET', K_BODY, evid)
  if not stored then
    redis.call('ZREM', K_OUTBOX, evid)
    redis.call('HDEL', K_LEASE, evid)
  else
    local sp1 = string.find(stored, ' ', 1, true)
    local sp2 = string.find(stored, ' ', sp1 + 1, true)
    local id = string.sub(stored, 1, sp1 - 1)
    if not waiting[id] then
      waiting[id] = true
      local lease = tonumber(redis.call('HGET', K_LEASE, evid))
      if not lease or lease <= NOW then
        claim_event(evid, string.sub(stored, sp1 + 1, sp2 - 1), string.sub(stored, sp2 + 1))
      end
    end
  end
end

local function purge(id)
  redis.call('DEL', P .. 'inst:' .. id, P .. 'hist:' .. id, P .. 'alive:' .. id)
  redis.call('ZREM', K_DEADLINES, id)
  redis.call('SREM', K_INSTANCES, id)
end

local function expire(id, rkey, r)
  local rec = {svc = r[5], inst = r[6], inc = r[7], seq = r[8], last = r[2], ttl = r[3],
    meta = r[9], ord = r[10]}
  emit(id, 'dead', 'alive', rec)
  redis.call('HSET', rkey, 'state', 'dead', 'since', NOW, 'ord', rec.ord)
  redis.call('DEL', P .. 'alive:' .. id)
  redis.call('ZADD', K_DEADLINES, NOW + RETENTION, id)
end

local due = redis.call('ZRANGE', K_DEADLINES, '-inf', NOW, 'BYSCORE', 'LIMIT', 0, limit)
for _, id in ipairs(due) do
  local rkey = P .. 'inst:' .. id
  local r = redis.call('HMGET', rkey, 'state', 'last', 'ttl', 'since', 'svc', 'inst', 'inc',
    'seq', 'meta', 'ord')
  if not r[1] then
    purge(id)
  elseif r[1] == 'alive' then
    local deadline = tonumber(r[2]) + tonumber(r[3])
    if deadline > NOW then
      redis.call('ZADD', K_DEADLINES, deadline, id)
    else
      expire(id, rkey, r)
    end
  else
    local purge_at = tonumber(r[4]) + RETENTION
    if purge_at > NOW then
      redis.call('ZADD', K_DEADLINES, purge_at, id)
    else
      purge(id)
    end
  end
end

local nxt = -1
local d = redis.call('ZRANGE', K_DEADLINES, 0, 0, 'WITHSCORES')
if d[2] then nxt = tonumber(d[2]) end
table.insert(out, 1, nxt)
table.insert(out, 1, NOW)
return out
