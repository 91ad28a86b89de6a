-- Shared prelude of the hbbus scripts (prepended by hbbus/store.py).
-- KEYS: deadlines, instances, outbox, outbox:body, outbox:lease, outbox:pending, log
-- ARGV[1] key prefix "{ns}:" (per-instance keys: same hash tag, same slot)
-- ARGV[2] lease_ms   ARGV[3] retention_ms   ARGV[4] log max length   ARGV[5] history length
-- All times are Redis server time in milliseconds (DESIGN.md section 3).
local P = ARGV[1]
local LEASE = tonumber(ARGV[2])
local RETENTION = tonumber(ARGV[3])
local LOGMAX = tonumber(ARGV[4])
local HISTLEN = tonumber(ARGV[5])
local K_DEADLINES, K_INSTANCES = KEYS[1], KEYS[2]
local K_OUTBOX, K_BODY, K_LEASE, K_PENDING = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local K_LOG = KEYS[7]
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

-- Record one transition: its event goes to the history (global stream and the instance's own
-- list) and to the outbox. If it is the instance's only pending event, the caller gets it to
-- publish now; else a reaper hands it out once the older ones are published. The caller
-- finalises after the broker confirmed; if it dies first, the lease runs out and any reaper
-- publishes the event again, with the same id.
local function emit(id, kind, prev, rec)
  local ord = math.max(NOW, (tonumber(rec.ord) or 0) + 1)
  rec.ord = ord
  local evid = string.sub(redis.sha1hex(kind .. '|' .. id .. '|' .. rec.inc .. '|' .. ord), 1, 24)
  local rk = kind .. '.' .. rec.svc .. '.' .. rec.inst
  local body = '{"v":1,"id":"' .. evid .. '","kind":"' .. kind .. '","service":"' .. rec.svc
    .. '","instance":"' .. rec.inst .. '","incarnation":"' .. rec.inc .. '","seq":' .. rec.seq
    .. ',"ord":' .. ord .. ',"at_ms":' .. NOW .. ',"last_seen_ms":' .. rec.last
    .. ',"ttl_ms":' .. rec.ttl .. ',"prev":"' .. prev .. '","meta":' .. rec.meta .. '}'
  redis.call('XADD', K_LOG, 'MAXLEN', '~', LOGMAX, '*', 'e', body)
  local hist = P .. 'hist:' .. id
  redis.call('LPUSH', hist, body)
  redis.call('LTRIM', hist, 0, HISTLEN - 1)
  redis.call('ZADD', K_OUTBOX, ord, evid)
  redis.call('HSET', K_BODY, evid, id .. ' ' .. rk .. ' ' .. body)
  if redis.call('HINCRBY', K_PENDING, id, 1) == 1 then
    claim_event(evid, rk, body)
  end
end
