-- Shared prelude of the hbbus scripts (prepended by hbbus/store.py).
-- KEYS: deadlines, instances (the earlier layout's, see migrate_all), outbox, outbox:body,
--       outbox:due (see claim_event), outbox:pending, log,
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
local K_OUTBOX, K_BODY, K_DUE, K_PENDING = KEYS[3], KEYS[4], KEYS[5], KEYS[6]
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

-- Instance records ---------------------------------------------------------------------------
-- One record per instance, packed: its fields in the order RF, joined by tabs (names, numbers
-- and history lines never hold one, and the meta is compact JSON, which escapes them), the
-- empty ones at the end left out (the first NCORE, up to the meta, are always there), kept
-- as a field of a bucket hash P r:<the first three hex digits of sha1(id)>. An instance costs
-- no key of its own: a hash of named fields, a meta key and an alive key cost 500 bytes more.
-- Alive is the state: alive or suspect with last + ttl still ahead (hbbus/lua/routes.lua).
-- hbbus/store.py decodes the same layout (RECORD_FIELDS): keep them together.
-- The scripts read and change records through rec_hmget / rec_set / rec_del, which keep each
-- record decoded for the rest of the call; rec_flush writes the changed ones back, once each,
-- before the script returns, and keeps K_SCOPES up to date: scope ("service:<svc>",
-- "zone:<zone>") -> how many of its instances are alive or suspect (the mass-expiry guard).
local RF = {'state', 'inc', 'seq', 'last', 'ttl', 'ivl', 'ord', 'first', 'since', 'zone', 'hist',
  'meta', 'pinc', 'dttl', 'sus', 'status', 'pub', 'muted', 'held', 'flips', 'flapping', 'gn', 'gm',
  'gv', 'gaps'}
local NRF, NCORE = #RF, 12
local RPAT = '^' .. string.rep('([^\t]*)\t', NCORE - 1) .. '(.*)$'
local K_SCOPES = P .. 'scopes'
local recs, rec_dirty, rec_was = {}, {}, {}

-- Packing also drops what the rest of the record says: since is kept as its distance back
-- from last, first as its distance back from since, ord as its distance on from since (each
-- 0 or short while an instance has had one transition, however old it is); the newest
-- history line (9 fields, see emit) has its incarnation and ttl as "=" when they are the
-- record's and its at_ms as a distance back from since; dttl is left out when it is the ttl,
-- status when it is "ok". About 90 bytes less; each value comes back whole (decode_record in
-- hbbus/store.py is the same in Python). Without since, last is the base.
local HIST9 = '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+ %S+) (%S+) (%S+)$'
-- and the state, and the newest line's kind and previous state, as one letter each (any other
-- word, longer, stays as it is)
local CODE = {alive = 'a', suspect = 's', dead = 'd', left = 'l', none = 'n', joined = 'j',
  recovered = 'r', restarted = 'R', flapping = 'f', stable = 'S', held = 'h', maintenance = 'm'}
local WORD = {}
for word, code in pairs(CODE) do WORD[code] = word end

local I_TTL, I_ORD, I_FIRST, I_SINCE, I_HIST, I_DTTL, I_STATUS = 5, 7, 8, 9, 11, 14, 16

-- The newest history line packed (to = true) or unpacked against the record's incarnation, ttl
-- and since.
local function hist_line(line, inc, ttl, since, to)
  local kind, prev, hinc, seq, at, mid, httl, flags = string.match(line, HIST9)
  if not kind then return line end  -- (a line of the earlier layout: 10 fields)
  local map = to and CODE or WORD
  kind, prev = map[kind] or kind, map[prev] or prev
  if to then
    if hinc == inc then hinc = '=' end
    if httl == ttl then httl = '=' end
  else
    if hinc == '=' then hinc = inc end
    if httl == '=' then httl = ttl end
  end
  return table.concat({kind, prev, hinc, seq, since - tonumber(at), mid, httl, flags}, ' ')
end

-- The newest history line of a record. It is kept packed as read (hp, with what it was packed
-- against, hc) until someone asks: a heartbeat does not unpack and pack it again.
local function rec_hist(r)
  if not r.hist and r.hp then
    r.hist = hist_line(r.hp, r.hc[1], r.hc[2], r.hc[3], false)
    r.hp = nil
  end
  return r.hist
end

local function rec_pack(r)
  local out = {CODE[r.state] or r.state or '', r.inc or '', r.seq or '', r.last or '', r.ttl or '', r.ivl or '',
    r.ord or '', r.first or '', r.since or '', r.zone or '', r.hist or '', r.meta or '',
    r.pinc or '', r.dttl or '', r.sus or '', r.status or '', r.pub or '', r.muted or '',
    r.held or '', r.flips or '', r.flapping or '', r.gn or '', r.gm or '', r.gv or '', r.gaps or ''}
  local last = tonumber(r.last)
  if last then
    local since = tonumber(r.since) or last
    if r.since then out[I_SINCE] = last - since end
    if r.first then out[I_FIRST] = since - tonumber(r.first) end
    if r.ord then out[I_ORD] = tonumber(r.ord) - since end
    if r.hist then
      out[I_HIST] = hist_line(r.hist, r.inc, r.ttl, since, true)
    elseif r.hp then
      local hc = r.hc
      if hc[1] == r.inc and hc[2] == r.ttl and hc[3] == since then
        out[I_HIST] = r.hp
      else
        out[I_HIST] = hist_line(rec_hist(r), r.inc, r.ttl, since, true)
      end
    end
  end
  if out[I_DTTL] == out[I_TTL] then out[I_DTTL] = '' end
  if out[I_STATUS] == 'ok' then out[I_STATUS] = '' end
  local n = NRF
  while n > NCORE and out[n] == '' do n = n - 1 end
  return table.concat(out, '\t', 1, n)
end

local function given(x)
  if x ~= '' then return x end
end

local function rec_unpack(id, raw)
  local state, inc, seq, last_s, ttl, ivl, ord, first, since, zone, hist, meta =
    string.match(raw, RPAT)
  if not meta then error('hbbus: unreadable record of ' .. id) end
  local slash = string.find(id, '/', 1, true)
  local r = {svc = string.sub(id, 1, slash - 1), inst = string.sub(id, slash + 1),
    state = WORD[state] or given(state), inc = given(inc), seq = given(seq), last = given(last_s),
    ttl = given(ttl), ivl = given(ivl), ord = given(ord), first = given(first),
    since = given(since), zone = given(zone), hist = given(hist), meta = meta}
  local tab = string.find(meta, '\t', 1, true)
  if tab then  -- the fields after the meta
    local i, at = NCORE, tab + 1
    r.meta = string.sub(meta, 1, tab - 1)
    while true do
      i = i + 1
      if i > NRF then error('hbbus: unreadable record of ' .. id) end
      local nxt = string.find(meta, '\t', at, true)
      local value = string.sub(meta, at, (nxt or 0) - 1)
      if value ~= '' then r[RF[i]] = value end
      if not nxt then break end
      at = nxt + 1
    end
  end
  if r.meta == '' then r.meta = nil end
  local last = tonumber(r.last)
  if last then  -- since, first and ord as numbers, as they are used
    local since = last
    if r.since then
      since = last - tonumber(r.since)
      r.since = since
    end
    if r.first then r.first = since - tonumber(r.first) end
    if r.ord then r.ord = since + tonumber(r.ord) end
    if r.hist then
      r.hp, r.hc, r.hist = r.hist, {r.inc, r.ttl, since}, nil
    end
  end
  r.dttl = r.dttl or r.ttl
  r.status = r.status or 'ok'
  return r
end

local bucket_ids = {}
-- The bucket of an instance: the first three hex digits of sha1("svc/inst").
local function bucket(id)
  local b = bucket_ids[id]
  if not b then
    b = string.sub(redis.sha1hex(id), 1, 3)
    bucket_ids[id] = b
  end
  return b
end

local function bucket_of(id)
  return P .. 'r:' .. bucket(id)
end

-- The deadline index. Every record has one deadline (its next transition, or its purge), kept
-- in its bucket's sorted set P dl:<xyz> (small and listpack-encoded: about 30 bytes an
-- instance, against 110 in one sorted set of every instance); K_DLMIN holds, for each
-- non-empty bucket, a time at or before its earliest deadline, never after: dl_add lowers it
-- at once (ZADD LT), so no deadline is ever missed. A deadline moved later (every heartbeat)
-- leaves it early; the reaper puts such a bucket right when it finds nothing due there
-- (dl_due marks it), and dl_flush, in the scripts other than ingest, sets every bucket they
-- changed exactly. claim.lua sets the earliest few exactly before it says when the next
-- deadline is (dl_exact_head). A steady heartbeat moves its deadline with one command
-- (dl_later), not four.
local K_DLMIN = P .. 'dlmin'
local dl_touched = {}
-- While records of the layout before packed ones are left (see migrate_one), the deadlines
-- of those not moved yet are still in its one sorted set, K_DEADLINES.
local OLD = redis.call('EXISTS', K_INSTANCES) == 1 or redis.call('EXISTS', K_DEADLINES) == 1
local migrate_one

local function dl_add(id, at)
  local b = bucket(id)
  redis.call('ZADD', P .. 'dl:' .. b, at, id)
  redis.call('ZADD', K_DLMIN, 'LT', at, b)
  dl_touched[b] = true
end

-- dl_add for a deadline that usually moves later (a steady heartbeat): one command when it
-- does (the bucket's entry in K_DLMIN, at or before the old deadline, stays right), the two
-- of dl_add when it does not (an earlier deadline, or none yet).
local function dl_later(id, at)
  if redis.call('ZADD', P .. 'dl:' .. bucket(id), 'XX', 'GT', 'CH', at, id) == 0 then
    dl_add(id, at)
  end
end

local function dl_rem(id)
  local b = bucket(id)
  redis.call('ZREM', P .. 'dl:' .. b, id)
  dl_touched[b] = true
end

local function dl_flush()
  for b in pairs(dl_touched) do
    local first = redis.call('ZRANGE', P .. 'dl:' .. b, 0, 0, 'WITHSCORES')
    if first[2] then
      redis.call('ZADD', K_DLMIN, first[2], b)
    else
      redis.call('ZREM', K_DLMIN, b)
    end
  end
  dl_touched = {}
end

-- The instances due at or before ``horizon``, at most ``limit`` (the earliest buckets first).
local function dl_due(horizon, limit)
  dl_flush()
  local ids = {}
  if OLD then
    ids = redis.call('ZRANGE', K_DEADLINES, '-inf', horizon, 'BYSCORE', 'LIMIT', 0, limit)
    if #ids >= limit then return ids end
  end
  for _, b in ipairs(redis.call('ZRANGE', K_DLMIN, '-inf', horizon, 'BYSCORE', 'LIMIT', 0, limit)) do
    dl_touched[b] = true  -- (early, if nothing is due there: dl_flush sets it right)
    for _, id in ipairs(redis.call('ZRANGE', P .. 'dl:' .. b, '-inf', horizon, 'BYSCORE', 'LIMIT',
        0, limit - #ids)) do
      ids[#ids + 1] = id
    end
    if #ids >= limit then break end
  end
  return ids
end

-- Make the earliest entries of K_DLMIN exact (at most 64 of them), so that the first one is
-- the next deadline, not a bucket left early by heartbeats.
local function dl_exact_head()
  dl_flush()
  for _ = 1, 64 do
    local head = redis.call('ZRANGE', K_DLMIN, 0, 0, 'WITHSCORES')
    if not head[1] then return end
    local first = redis.call('ZRANGE', P .. 'dl:' .. head[1], 0, 0, 'WITHSCORES')
    if first[2] == head[2] then return end
    if first[2] then
      redis.call('ZADD', K_DLMIN, first[2], head[1])
    else
      redis.call('ZREM', K_DLMIN, head[1])
    end
  end
end

-- An instance's deadline (none: never).
local function dl_score(id)
  local at = redis.call('ZSCORE', P .. 'dl:' .. bucket(id), id)
  if not at and OLD then at = redis.call('ZSCORE', K_DEADLINES, id) end
  return at and tonumber(at) or math.huge
end

-- How many deadlines are at or before ``t``.
local function dl_count_upto(t)
  dl_flush()
  local n = OLD and redis.call('ZCOUNT', K_DEADLINES, '-inf', t) or 0
  for _, b in ipairs(redis.call('ZRANGE', K_DLMIN, '-inf', t, 'BYSCORE')) do
    n = n + redis.call('ZCOUNT', P .. 'dl:' .. b, '-inf', t)
  end
  return n
end

local function rec_new(id)
  local slash = string.find(id, '/', 1, true)
  return {svc = string.sub(id, 1, slash - 1), inst = string.sub(id, slash + 1)}
end

local function is_live(r)
  return r and (r.state == 'alive' or r.state == 'suspect') or false
end

-- The record of ``id`` (a table of its fields, svc and inst included), or false.
local function rec_get(id)
  local r = recs[id]
  if r ~= nil then return r end
  local raw = redis.call('HGET', bucket_of(id), id)
  if raw then
    r = rec_unpack(id, raw)
  elseif OLD then
    r = migrate_one(id)  -- written and counted at once
  else
    r = false
  end
  recs[id] = r
  rec_was[id] = {is_live(r), r and r.zone or ''}
  return r
end

-- Like HMGET on the record: a value per name, false where there is none.
local function rec_hmget(id, ...)
  local r = rec_get(id)
  local names, v = {...}, {}
  for i = 1, #names do
    local name = names[i]
    if r and name == 'hist' then v[i] = rec_hist(r) or false else v[i] = r and r[name] or false end
  end
  return v
end

-- Like HSET on the record (creates it): name, value, name, value...
local function rec_set(id, ...)
  local r = rec_get(id)
  if not r then
    r = rec_new(id)
    recs[id] = r
  end
  local kv = {...}
  for i = 1, #kv, 2 do
    local value = kv[i + 1]
    if type(value) == 'number' then value = tostring(value) end  -- as HSET would store it
    r[kv[i]] = value
    if kv[i] == 'hist' then r.hp = nil end
  end
  rec_dirty[id] = true
end

local function rec_del(id)
  rec_get(id)
  recs[id] = false
  rec_dirty[id] = true
end

local function count_in_scopes(svc, zone, delta)
  for _, scope in ipairs({'service:' .. svc, zone ~= '' and 'zone:' .. zone or nil}) do
    if redis.call('HINCRBY', K_SCOPES, scope, delta) <= 0 then
      redis.call('HDEL', K_SCOPES, scope)
    end
  end
end

local function rec_flush()
  for id in pairs(rec_dirty) do
    local r, was = recs[id], rec_was[id]
    if r then
      redis.call('HSET', bucket_of(id), id, rec_pack(r))
    else
      redis.call('HDEL', bucket_of(id), id)
    end
    local live, zone = is_live(r), r and r.zone or ''
    if live ~= was[1] or (live and zone ~= was[2]) then
      local svc = string.sub(id, 1, string.find(id, '/', 1, true) - 1)
      if was[1] then count_in_scopes(svc, was[2], -1) end
      if live then count_in_scopes(svc, zone, 1) end
    end
    was[1], was[2] = live, zone
  end
  rec_dirty = {}
end

-- A history kept as lines, newest first: the newest line in the record (field hist), the older
-- ones in P history:<id> (at most HISTLEN - 1 of them), written only once there are two.
local function push_history(id, line)
  if HISTLEN < 2 then return end
  local hkey = P .. 'history:' .. id
  local older = redis.call('GET', hkey)
  if older then
    local at, kept = 0, 0  -- keep the first HISTLEN - 2 lines of the older ones
    while kept < HISTLEN - 2 do
      at = string.find(older, '\n', at + 1, true)
      if not at then break end
      kept = kept + 1
    end
    if HISTLEN == 2 then
      older = nil
    elseif at then
      older = string.sub(older, 1, at - 1)
    end
  end
  redis.call('SET', hkey, older and (line .. '\n' .. older) or line)
end

-- The layout before packed records: a hash P inst:<id> per instance with P meta:, P alive:
-- and P history: keys (its lines all there), the set K_INSTANCES of every instance, one
-- sorted set of deadlines (K_DEADLINES), and a set of members per service (P svc:) and zone
-- (P zone:). A record is moved into its bucket when a call first reads it (rec_get), and every
-- call first moves MIGRATE_STEP of them, so a namespace is moved in a few seconds of calls
-- that each stay short (100,000 at once kept Redis busy 4-7 s). A moved record takes its
-- deadline and its place in K_NOTALIVE along, and is counted in K_SCOPES as it is written.
local MIGRATE_STEP = 1000

-- Every record moved: deadlines left without a record move too (the reaper purges them), and
-- K_NOTALIVE is complete.
local function migrated()
  local due = redis.call('ZRANGE', K_DEADLINES, 0, -1, 'WITHSCORES')
  for i = 1, #due, 2 do dl_add(due[i], due[i + 1]) end
  redis.call('DEL', K_DEADLINES)
  redis.call('HSET', K_OBSERVER, 'notalive', 'complete')
  OLD = false
end

migrate_one = function(id)
  local hkey = P .. 'history:' .. id
  local flat = redis.call('HGETALL', P .. 'inst:' .. id)
  local r = false
  if #flat > 0 then
    r = rec_new(id)
    for i = 1, #flat, 2 do
      if flat[i + 1] ~= '' and flat[i] ~= 'svc' and flat[i] ~= 'inst' then
        r[flat[i]] = flat[i + 1]
      end
    end
    r.meta = redis.call('GET', P .. 'meta:' .. id) or r.meta  -- (older still: in the record)
    local hist = redis.call('GET', hkey)
    if hist then
      local nl = string.find(hist, '\n', 1, true)
      r.hist = nl and string.sub(hist, 1, nl - 1) or hist
      if nl then redis.call('SET', hkey, string.sub(hist, nl + 1)) else redis.call('DEL', hkey) end
    end
    -- written and counted now, before any old key goes: a later error in this call loses
    -- nothing (scripts are not rolled back)
    redis.call('HSET', bucket_of(id), id, rec_pack(r))
    if is_live(r) then count_in_scopes(r.svc, r.zone or '', 1) end
    if r.state == 'suspect' then
      redis.call('ZADD', K_NOTALIVE, NOTALIVE_SUSPECT, id)
    elseif r.state == 'dead' then
      redis.call('ZADD', K_NOTALIVE, tonumber(r.since) or NOW, id)
    elseif r.state == 'left' then
      redis.call('ZADD', K_NOTALIVE, 0, id)
    end
    redis.call('SREM', P .. 'svc:' .. r.svc, id)
    if r.zone then redis.call('SREM', P .. 'zone:' .. r.zone, id) end
  else
    redis.call('DEL', hkey)
  end
  local at = redis.call('ZSCORE', K_DEADLINES, id)
  if at then
    redis.call('ZREM', K_DEADLINES, id)
    local moved = redis.call('ZSCORE', P .. 'dl:' .. bucket(id), id)  -- `maintenance off`
    dl_add(id, moved and math.min(tonumber(moved), tonumber(at)) or at)
  end
  redis.call('DEL', P .. 'inst:' .. id, P .. 'meta:' .. id, P .. 'alive:' .. id,
    P .. 'hist:' .. id)
  redis.call('SREM', K_INSTANCES, id)
  if redis.call('SCARD', K_INSTANCES) == 0 then migrated() end
  return r
end

if OLD then
  for _, id in ipairs(redis.call('SRANDMEMBER', K_INSTANCES, MIGRATE_STEP)) do rec_get(id) end
  if OLD and redis.call('EXISTS', K_INSTANCES) == 0 then migrated() end
  rec_flush()
  dl_flush()
end

-- Remove every trace of an instance (its retention is over, or `hbbus forget`).
local function purge(id)
  local held = rec_hmget(id, 'held')[1]
  if held and held ~= '' then redis.call('ZREM', P .. 'held:' .. held, id) end
  rec_del(id)
  redis.call('DEL', P .. 'history:' .. id)
  dl_rem(id)
  if OLD then redis.call('ZREM', K_DEADLINES, id) end
  redis.call('ZREM', K_FLAPCHECK, id)
  redis.call('ZREM', K_NOTALIVE, id)
end

-- The outbox keeps each instance's unpublished events in order: an event is handed out for
-- publishing (with a lease) only when no older event of the same instance is still pending.
-- K_DUE holds each instance's oldest pending event, scored with the time it may be handed
-- out: its lease's end, or 0 (now: not handed out yet, or released). The events behind it
-- wait in P outbox:wait:<svc>/<inst>, scored by ord, until it is finalised. The reaper thus
-- reads only what it hands out (a ZRANGE of K_DUE up to now), not every event in flight.
local function outbox_wait_key(id)
  return P .. 'outbox:wait:' .. id
end

-- The outbox of the release before K_DUE (a hash P outbox:lease of lease ends, the events
-- behind an instance's oldest found by reading the whole outbox) is indexed once, by the
-- first script of this release that touches the outbox.
local outbox_indexed = false
local function outbox_index()
  if outbox_indexed then return end
  outbox_indexed = true
  local flag = P .. 'outbox:indexed'
  if redis.call('EXISTS', flag) == 1 then return end
  local old, heads = P .. 'outbox:lease', {}
  local entries = redis.call('ZRANGE', K_OUTBOX, 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    local evid = entries[i]
    local stored = redis.call('HGET', K_BODY, evid)
    if not stored then
      redis.call('ZREM', K_OUTBOX, evid)
    else
      local id = string.sub(stored, 1, string.find(stored, ' ', 1, true) - 1)
      if heads[id] then
        redis.call('ZADD', outbox_wait_key(id), entries[i + 1], evid)
      else
        heads[id] = true
        redis.call('ZADD', K_DUE, redis.call('HGET', old, evid) or 0, evid)
      end
    end
  end
  redis.call('DEL', old)
  redis.call('SET', flag, '1')
end

local function claim_event(evid, rk, body)
  redis.call('ZADD', K_DUE, NOW + LEASE, evid)
  out[#out + 1] = evid
  out[#out + 1] = rk
  out[#out + 1] = body
end

-- Put one event in the log (and, given ``hist`` = {instance id, line}, its instance's
-- history) and in the outbox. If it is its instance's only pending event,
-- the caller gets it to publish now; else a reaper hands it out once the older ones are
-- published. The caller finalises after the broker confirmed; if it dies first, the lease runs
-- out and any reaper publishes the event again, with the same id.
local function record_event(id, evid, ord, rk, body, hist, muted)
  redis.call('XADD', K_LOG, 'MAXLEN', '~', LOGMAX, '*', 'e', body)
  if hist then
    local newer = rec_hmget(hist[1], 'hist')[1]
    if newer then push_history(hist[1], newer) end
    rec_set(hist[1], 'hist', hist[2])
  end
  if muted then return end  -- maintenance: in the history, never published
  outbox_index()
  redis.call('ZADD', K_OUTBOX, ord, evid)
  redis.call('HSET', K_BODY, evid, id .. ' ' .. rk .. ' ' .. body)
  if redis.call('HINCRBY', K_PENDING, id, 1) > 1 then
    redis.call('ZADD', outbox_wait_key(id), ord, evid)  -- behind the older ones
  elseif NO_CLAIM then
    redis.call('ZADD', K_DUE, 0, evid)
  else
    claim_event(evid, rk, body)
  end
end

-- An instance's latest meta (JSON).
local function meta_of(id)
  return rec_hmget(id, 'meta')[1] or '{}'
end

-- K_NOTALIVE holds every instance that is not alive from a store's birth on, so the
-- mass-expiry guard may rely on it (claim.lua). A store with no instances is as good as born:
-- mark it so (true when it did).
local function mark_notalive_if_empty()
  -- every record has a deadline (a transition, or its purge)
  if OLD or redis.call('EXISTS', K_DLMIN) == 1 then return false end
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
  local f = rec_hmget(id, 'flips', 'flapping')
  local times = {}
  for t in string.gmatch(f[1] or '', '%d+') do
    if tonumber(t) > NOW - FLAP_WINDOW then times[#times + 1] = t end
  end
  times[#times + 1] = string.format('%d', NOW)
  while #times > FLAP_MAX + 1 do table.remove(times, 1) end
  rec_set(id, 'flips', table.concat(times, ' '))
  if f[2] == '1' then
    redis.call('ZADD', K_FLAPCHECK, NOW + FLAP_STABLE, id)
    return true
  end
  if #times > FLAP_MAX then
    rec_set(id, 'flapping', '1')
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
    rec_set(id, 'pub', kind == 'dead' and 'dead' or '')  -- none: alive
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
  -- event): "kind prev incarnation seq at_ms ord-at_ms at_ms-last_seen_ms ttl_ms flags", flags
  -- being "-" or any of "m" (muted), "r" (resync), "h<scope>" (held), joined by commas. The id
  -- is left out (it is sha1 of kind|id|incarnation|ord, above), ord and last_seen_ms are
  -- differences: the line is 60 bytes, not 110. hbbus/store.py parses it (and the lines of
  -- the earlier layout, which began with the id and held ord and last_seen_ms whole).
  local flags = {}
  if muted then flags[#flags + 1] = 'm' end
  if kind == 'joined' and NOW < RESYNC_UNTIL then flags[#flags + 1] = 'r' end
  if held then flags[#flags + 1] = 'h' .. held end
  local entry = table.concat({kind, prev, rec.inc, rec.seq, NOW, ord - NOW,
    NOW - tonumber(rec.last), rec.ttl, #flags > 0 and table.concat(flags, ',') or '-'}, ' ')
  record_event(id, evid, ord, rk, body, {id, entry}, muted)
end

-- Publish a death the guard held (``prev`` "held"), and forget that it was held.
local function release_one(scope, id)
  redis.call('ZREM', P .. 'held:' .. scope, id)
  local r = rec_hmget(id, 'state', 'held', 'svc', 'inst', 'inc', 'seq', 'last', 'ttl', 'ord')
  if r[1] ~= 'dead' or r[2] ~= scope then return 0 end  -- it came back, or was forgotten
  local rec = {svc = r[3], inst = r[4], inc = r[5], seq = r[6], last = r[7], ttl = r[8],
    meta = meta_of(id), ord = r[9]}
  emit(id, 'dead', 'held', rec, false)
  rec_set(id, 'muted', '0', 'held', '', 'ord', rec.ord)
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
