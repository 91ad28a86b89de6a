-- Shared prelude of the hbbus scripts (prepended by hbbus/store.py).
-- ARGV[1] key prefix "{ns}:"   ARGV[2] lease_ms   ARGV[3] retention_ms
-- ARGV[4] log (stream) max length   ARGV[5] per-instance history length
-- All times are Redis server time in milliseconds (DESIGN.md section 3).
local P = ARGV[1]
local LEASE = tonumber(ARGV[2])
local RETENTION = tonumber(ARGV[3])
local LOGMAX = tonumber(ARGV[4])
local HISTLEN = tonumber(ARGV[5])
local K_DEADLINES = P .. 'deadlines'
local K_INSTANCES = P .. 'instances'
local K_OUTBOX = P .. 'outbox'
local K_BODY = P .. 'outbox:body'
local K_LOG = P .. 'log'
local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}

-- Record one transition: its event goes to the history (global stream and the instance's own
-- list) and to the outbox, claimed by the caller with a lease; the caller publishes it and then
-- finalises. If the caller dies first, the lease runs out and any reaper publishes it again.
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
  redis.call('ZADD', K_OUTBOX, NOW + LEASE, evid)
  redis.call('HSET', K_BODY, evid, rk .. ' ' .. body)
  out[#out + 1] = evid
  out[#out + 1] = rk
  out[#out + 1] = body
end
