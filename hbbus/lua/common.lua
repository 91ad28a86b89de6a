-- Shared prelude of the hbbus scripts (prepended by hbbus/store.py).
-- KEYS: deadlines, instances, outbox, outbox:body, outbox:lease, outbox:pending, log,
--       observers (aggregator -> "probe_ms seen_ms"), observer (the observer's own state),
--       maintenance (service or service/instance -> "until_ms reason")
-- ARGV[1] key prefix "{ns}:" (per-instance keys: same hash tag, same slot)
-- ARGV[2] lease_ms   ARGV[3] retention_ms   ARGV[4] log max length   ARGV[5] history length
-- ARGV[6] observer_ttl_ms   ARGV[7] degraded_after_ms   ARGV[8] grace_ms
-- Script arguments start at ARGV[9].
-- All times are Redis server time in milliseconds (DESIGN.md section 3).
local P = ARGV[1]
local LEASE = tonumber(ARGV[2])
local RETENTION = tonumber(ARGV[3])
local LOGMAX = tonumber(ARGV[4])
local HISTLEN = tonumber(ARGV[5])
local OBSERVER_TTL = tonumber(ARGV[6])
local DEGRADED_AFTER = tonumber(ARGV[7])
local GRACE = tonumber(ARGV[8])
local K_DEADLINES, K_INSTANCES = KEYS[1], KEYS[2]
local K_OUTBOX, K_BODY, K_LEASE, K_PENDING = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local K_LOG, K_OBSERVERS, K_OBSERVER, K_MAINT = KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}

-- The outbox keeps each instance's unpublished events in order: an event is handed out for
-- publishing (with a lease) only when no older event of the same instance is still pending.
local function claim_event(evid, rk, body)
  redis.call('HSET', K_LEASE, evid, NOW + LEASE)
  out[#out + 1] = evid
  out[#out + 1] = rk
  out[#out + 1] = body
end

-- Put one event in the history and in the outbox. If it is its instance's only pending event,
-- the caller gets it to publish now; else a reaper hands it out once the older ones are
-- published. The caller finalises after the broker confirmed; if it dies first, the lease runs
-- out and any reaper publishes the event again, with the same id.
local function record_event(id, evid, ord, rk, body, hist, muted)
  redis.call('XADD', K_LOG, 'MAXLEN', '~', LOGMAX, '*', 'e', body)
  if hist then
    redis.call('LPUSH', hist, body)
    redis.call('LTRIM', hist, 0, HISTLEN - 1)
  end
  if muted then return end  -- maintenance: in the history, never published
  redis.call('ZADD', K_OUTBOX, ord, evid)
  redis.call('HSET', K_BODY, evid, id .. ' ' .. rk .. ' ' .. body)
  if redis.call('HINCRBY', K_PENDING, id, 1) == 1 then
    claim_event(evid, rk, body)
  end
end

-- After Redis lost its data, the records rebuilt from arriving heartbeats say so.
local RESYNC_UNTIL = tonumber(redis.call('HGET', K_OBSERVER, 'resync_until') or 0)

-- The end of the maintenance window covering an instance (its own or its service's), or 0.
local function maintenance_until(svc, inst)
  local until_ms = 0
  for _, v in ipairs(redis.call('HMGET', K_MAINT, svc, svc .. '/' .. inst)) do
    if v then
      local u = tonumber(string.sub(v, 1, string.find(v, ' ', 1, true) - 1))
      if u > NOW and u > until_ms then until_ms = u end
    end
  end
  return until_ms
end

-- A transition of one instance. ``rec`` holds the record's fields; rec.ord grows.
-- ``muted``: under maintenance, it goes to the history only.
local function emit(id, kind, prev, rec, muted)
  local ord = math.max(NOW, (tonumber(rec.ord) or 0) + 1)
  rec.ord = ord
  local evid = string.sub(redis.sha1hex(kind .. '|' .. id .. '|' .. rec.inc .. '|' .. ord), 1, 24)
  local rk = kind .. '.' .. rec.svc .. '.' .. rec.inst
  local body = '{"v":1,"id":"' .. evid .. '","kind":"' .. kind .. '","service":"' .. rec.svc
    .. '","instance":"' .. rec.inst .. '","incarnation":"' .. rec.inc .. '","seq":' .. rec.seq
    .. ',"ord":' .. ord .. ',"at_ms":' .. NOW .. ',"last_seen_ms":' .. rec.last
    .. ',"ttl_ms":' .. rec.ttl .. ',"prev":"' .. prev .. '","meta":' .. rec.meta
  if kind == 'joined' and NOW < RESYNC_UNTIL then body = body .. ',"resync":true' end
  if muted then body = body .. ',"muted":true' end
  body = body .. '}'
  record_event(id, evid, ord, rk, body, P .. 'hist:' .. id, muted)
end

-- When the instance is next due: suspect half an interval after a missed heartbeat (if that
-- comes before the TTL), else dead at the TTL.
local function next_due(state, last, ivl, ttl)
  local suspect_at = last + math.floor(tonumber(ivl) * 1.5)
  local dead_at = last + tonumber(ttl)
  if state == 'alive' and suspect_at < dead_at then return suspect_at end
  return dead_at
end
