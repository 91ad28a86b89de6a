-- Shared prelude of the hbbus scripts (prepended by hbbus/store.py).
-- KEYS: deadlines, instances, outbox, outbox:body, outbox:lease, outbox:pending, log,
--       observers (aggregator -> "probe_ms seen_ms"), observer (the observer's own state),
--       maintenance (service or service/instance -> "until_ms reason"),
--       guard (tripped scope -> "tripped_ms last_release_ms"),
--       flapcheck (flapping instance -> when to see whether it is stable),
--       detectors (service -> "k floor_ms ceiling_ms": adaptive deadlines)
-- ARGV[1] key prefix "{ns}:" (per-instance keys: same hash tag, same slot)
-- ARGV[2] lease_ms   ARGV[3] retention_ms   ARGV[4] log max length   ARGV[5] history length
-- ARGV[6] observer_ttl_ms   ARGV[7] degraded_after_ms   ARGV[8] grace_ms
-- ARGV[9] mass-expiry share   ARGV[10] at least   ARGV[11] window_ms
-- ARGV[12] auto-release after ms (0: only `hbbus guard release`)   ARGV[13] ms between releases
-- ARGV[14] flap: more than this many dead/recovered changes   ARGV[15] in this window (ms)
-- ARGV[16] flapping ends after this long without such a change (ms)
-- Script arguments start at ARGV[S], S = 17.
-- All times are Redis server time in milliseconds (DESIGN.md section 3).
local P = ARGV[1]
local LEASE = tonumber(ARGV[2])
local RETENTION = tonumber(ARGV[3])
local LOGMAX = tonumber(ARGV[4])
local HISTLEN = tonumber(ARGV[5])
local OBSERVER_TTL = tonumber(ARGV[6])
local DEGRADED_AFTER = tonumber(ARGV[7])
local GRACE = tonumber(ARGV[8])
local MASS_SHARE, MASS_MIN, MASS_WINDOW = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local RELEASE_AFTER, RELEASE_EVERY = tonumber(ARGV[12]), tonumber(ARGV[13])
local FLAP_MAX, FLAP_WINDOW, FLAP_STABLE = tonumber(ARGV[14]), tonumber(ARGV[15]),
  tonumber(ARGV[16])
local S = 17
local K_DEADLINES, K_INSTANCES = KEYS[1], KEYS[2]
local K_OUTBOX, K_BODY, K_LEASE, K_PENDING = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local K_LOG, K_OBSERVERS, K_OBSERVER, K_MAINT = KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local K_GUARD, K_FLAPCHECK, K_DETECTORS = KEYS[11], KEYS[12], KEYS[13]
-- Sorted set of the instances that are not alive, so the mass-expiry guard can bound a scope's
-- count without reading its members: suspect -> NOTALIVE_SUSPECT, dead -> since, left -> 0.
local K_NOTALIVE = P .. 'notalive'
local NOTALIVE_SUSPECT = 4503599627370496  -- 2^52: after any time
local NO_CLAIM = false  -- true: events wait in the outbox for a reaper (callers that do not publish)
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

-- Put one event in the log (and, given ``hist`` = {key, entry}, its instance's history) and
-- in the outbox. If it is its instance's only pending event,
-- the caller gets it to publish now; else a reaper hands it out once the older ones are
-- published. The caller finalises after the broker confirmed; if it dies first, the lease runs
-- out and any reaper publishes the event again, with the same id.
local function record_event(id, evid, ord, rk, body, hist, muted)
  redis.call('XADD', K_LOG, 'MAXLEN', '~', LOGMAX, '*', 'e', body)
  if hist then  -- a string of lines, newest first: 80 bytes less than a list of one entry
    local lines = hist[2]
    local older = redis.call('GET', hist[1])
    if older and HISTLEN > 1 then
      local at, kept = 0, 0  -- keep the first HISTLEN - 1 lines of the older ones
      while kept < HISTLEN - 1 do
        at = string.find(older, '\n', at + 1, true)
        if not at then break end
        kept = kept + 1
      end
      if at then older = string.sub(older, 1, at - 1) end
      lines = lines .. '\n' .. older
    end
    redis.call('SET', hist[1], lines)
  end
  if muted then return end  -- maintenance: in the history, never published
  redis.call('ZADD', K_OUTBOX, ord, evid)
  redis.call('HSET', K_BODY, evid, id .. ' ' .. rk .. ' ' .. body)
  if redis.call('HINCRBY', K_PENDING, id, 1) == 1 and not NO_CLAIM then
    claim_event(evid, rk, body)
  end
end

-- An instance's latest meta (JSON). It is kept in a string key of its own, not in the record:
-- a value longer than hash-max-listpack-value (64 bytes) turns the whole record from a
-- listpack into a hashtable, four times its size.
-- (A record written before this layout still holds it: read there until the next heartbeat.)
local function meta_of(id)
  return redis.call('GET', P .. 'meta:' .. id) or redis.call('HGET', P .. 'inst:' .. id, 'meta')
    or '{}'
end

-- K_NOTALIVE holds every instance that is not alive from a store's birth on, so the
-- mass-expiry guard may rely on it (claim.lua). A store with no instances is as good as born:
-- mark it so (true when it did).
local function mark_notalive_if_empty()
  if redis.call('SCARD', K_INSTANCES) ~= 0 then return false end
  redis.call('HSET', K_OBSERVER, 'notalive', 'complete')
  return true
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
-- ``muted``: under maintenance or held by the mass-expiry guard (then ``held`` names the
-- scope), it goes to the history only.
local emit

-- Flap damping: an instance whose dead/recovered changes exceed FLAP_MAX within FLAP_WINDOW is
-- flapping: one `flapping` event, then its dead/recovered changes are coalesced (history
-- only) until it has been stable for FLAP_STABLE. Returns true when this change is coalesced.
local function flap_gate(id, kind, prev, rec)
  local rkey = P .. 'inst:' .. id
  local f = redis.call('HMGET', rkey, 'flips', 'flapping')
  local times = {}
  for t in string.gmatch(f[1] or '', '%d+') do
    if tonumber(t) > NOW - FLAP_WINDOW then times[#times + 1] = t end
  end
  times[#times + 1] = string.format('%d', NOW)
  while #times > FLAP_MAX + 1 do table.remove(times, 1) end
  redis.call('HSET', rkey, 'flips', table.concat(times, ' '))
  if f[2] == '1' then
    redis.call('ZADD', K_FLAPCHECK, NOW + FLAP_STABLE, id)
    return true
  end
  if #times > FLAP_MAX then
    redis.call('HSET', rkey, 'flapping', '1')
    redis.call('ZADD', K_FLAPCHECK, NOW + FLAP_STABLE, id)
    emit(id, 'flapping', prev, rec, false)
    return true
  end
  return false
end

emit = function(id, kind, prev, rec, muted, held)
  if not muted and (kind == 'dead' or kind == 'recovered') and flap_gate(id, kind, prev, rec) then
    muted = true
  end
  if not muted and (kind == 'dead' or kind == 'recovered' or kind == 'joined') then
    redis.call('HSET', P .. 'inst:' .. id, 'pub', kind == 'dead' and 'dead' or 'alive')
  end
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
  if held then body = body .. ',"held":"' .. held .. '"' end
  body = body .. '}'
  -- The history keeps each transition in one line without the meta (the log has the whole
  -- event): "id kind prev incarnation seq ord at_ms last_seen_ms ttl_ms flags", flags being
  -- "-" or any of "m" (muted), "r" (resync), "h<scope>" (held), joined by commas.
  -- hbbus/store.py parses it; a full event JSON here cost 400 bytes per instance.
  local flags = {}
  if muted then flags[#flags + 1] = 'm' end
  if kind == 'joined' and NOW < RESYNC_UNTIL then flags[#flags + 1] = 'r' end
  if held then flags[#flags + 1] = 'h' .. held end
  local entry = table.concat({evid, kind, prev, rec.inc, rec.seq, ord, NOW, rec.last, rec.ttl,
    #flags > 0 and table.concat(flags, ',') or '-'}, ' ')
  record_event(id, evid, ord, rk, body, {P .. 'history:' .. id, entry}, muted)
end

-- The mass-expiry guard. A scope is "service:<svc>" or "zone:<zone>"; its members are the
-- set P svc:<svc> or P zone:<zone>; its held deaths the sorted set P held:<scope>.
local function members_key(scope)
  if string.sub(scope, 1, 8) == 'service:' then return P .. 'svc:' .. string.sub(scope, 9) end
  return P .. scope
end

-- Publish a death the guard held (``prev`` "held"), and forget that it was held.
local function release_one(scope, id)
  redis.call('ZREM', P .. 'held:' .. scope, id)
  local rkey = P .. 'inst:' .. id
  local r = redis.call('HMGET', rkey, 'state', 'held', 'svc', 'inst', 'inc', 'seq', 'last', 'ttl',
    'ord')
  if r[1] ~= 'dead' or r[2] ~= scope then return 0 end  -- it came back, or was forgotten
  local rec = {svc = r[3], inst = r[4], inc = r[5], seq = r[6], last = r[7], ttl = r[8],
    meta = meta_of(id), ord = r[9]}
  emit(id, 'dead', 'held', rec, false)
  redis.call('HSET', rkey, 'muted', '0', 'held', '', 'ord', rec.ord)
  return 1
end

-- When the instance is next due: suspect half an interval after a missed heartbeat (if that
-- comes before the TTL), else dead at the TTL.
local function next_due(state, last, ivl, ttl, sus)
  local suspect_at = last + math.floor(tonumber(ivl) * 1.5)
  if sus and sus ~= '' then suspect_at = last + tonumber(sus) end
  local dead_at = last + tonumber(ttl)
  if state == 'alive' and suspect_at < dead_at then return suspect_at end
  return dead_at
end
