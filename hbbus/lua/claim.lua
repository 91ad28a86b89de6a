-- The reaper's step. ARGV[S] = limit, ARGV[S + 1] = the calling aggregator.
-- 1. The outbox: an instance's oldest pending event without a live lease (its publisher died
--    or gave up, or it waited behind an older one) is handed out (again).
-- 2. The watermark: the oldest probe stamp among live aggregators. Every heartbeat published
--    before it has been applied, so only deadlines at or below it may be judged. When it lags
--    more than degraded_after_ms (or no aggregator has caught up) the observer is degraded:
--    one observer.degraded event, expiries held; observer.recovered when it catches up, after
--    which instances last heard before the recovery get a fresh grace period.
-- 3. Due deadlines up to the watermark: alive -> suspect -> dead; dead or left records past
--    their retention are purged; a deadline that moved (a heartbeat came) is re-filed.
-- Returns {now_ms, next_deadline_ms or -1, upcoming_ms or -1, evid, routing_key, body, ...},
-- upcoming_ms being the first deadline after now when the next one is already past.
local limit, me = tonumber(ARGV[S]), ARGV[S + 1]

-- each instance's oldest pending event whose lease ran out, or that was never handed out
outbox_index()
for _, evid in ipairs(redis.call('ZRANGE', K_DUE, '-inf', NOW, 'BYSCORE', 'LIMIT', 0, limit)) do
  local stored = redis.call('HGET', K_BODY, evid)
  if not stored then  -- finalised by another hand meanwhile
    redis.call('ZREM', K_DUE, evid)
    redis.call('ZREM', K_OUTBOX, evid)
  else
    local sp1 = string.find(stored, ' ', 1, true)
    local sp2 = string.find(stored, ' ', sp1 + 1, true)
    claim_event(evid, string.sub(stored, sp1 + 1, sp2 - 1), string.sub(stored, sp2 + 1))
  end
end

-- the watermark -------------------------------------------------------------------------------
-- the calling aggregator is alive even while its ingest waits: it keeps holding the
-- watermark at its last probe rather than dropping out with heartbeats in hand
if me ~= '' then
  local mine = redis.call('HGET', K_OBSERVERS, me)
  if mine then
    local sp = string.find(mine, ' ', 1, true)
    redis.call('HSET', K_OBSERVERS, me, string.sub(mine, 1, sp - 1) .. ' ' .. string.format('%d', NOW))
  end
end
local wm, live = nil, 0
local entries = redis.call('HGETALL', K_OBSERVERS)
for i = 1, #entries, 2 do
  local sp = string.find(entries[i + 1], ' ', 1, true)
  local probe = tonumber(string.sub(entries[i + 1], 1, sp - 1))
  local seen = tonumber(string.sub(entries[i + 1], sp + 1))
  if NOW - seen > OBSERVER_TTL then
    redis.call('HDEL', K_OBSERVERS, entries[i])  -- gone without a word: no longer waited for
  else
    live = live + 1
    if not wm or probe < wm then wm = probe end
  end
end
if wm == 0 then wm = nil end  -- a live aggregator that has not caught up yet holds everything

local obs = redis.call('HMGET', K_OBSERVER, 'state', 'since', 'last_wm', 'recovered_at',
  'notalive')
-- Whether K_NOTALIVE holds every instance that is not alive: from a store's birth on (ingest.lua
-- marks it when it creates the epoch; here for a namespace whose store was born before that
-- mark existed, once it has no instances). A namespace that already had instances when it
-- came in (an upgrade from a version without it) never relies on it: its guard counts member
-- by member.
local notalive_complete = obs[5] == 'complete' or mark_notalive_if_empty()
local last_wm = math.min(tonumber(obs[3]) or NOW, NOW)  -- a new namespace starts caught up
if wm and wm > last_wm then last_wm = math.min(wm, NOW) end
redis.call('HSET', K_OBSERVER, 'last_wm', string.format('%d', last_wm), 'live', live)
local lag = NOW - last_wm
local recovered_at = tonumber(obs[4]) or 0

local function observer_event(kind, prev, reason, extra)
  local ord = NOW
  local evid = string.sub(redis.sha1hex(kind .. '|' .. NOW .. '|' .. P), 1, 24)
  local body = '{"v":1,"id":"' .. evid .. '","kind":"' .. kind .. '","service":"","instance":"",'
    .. '"incarnation":"","seq":0,"ord":' .. ord .. ',"at_ms":' .. NOW .. ',"last_seen_ms":'
    .. last_wm .. ',"ttl_ms":0,"prev":"' .. prev .. '","reason":' .. cjson.encode(reason)
    .. ',"meta":{"lag_ms":' .. lag .. ',"aggregators":' .. live .. extra .. '}}'
  record_event('observer', evid, ord, kind, body, false)
end

if lag > DEGRADED_AFTER and obs[1] ~= 'degraded' then
  local reason
  if live == 0 then
    reason = 'no aggregator is consuming heartbeats'
  elseif not wm then
    reason = 'no aggregator has caught up with the heartbeat queue yet'
  else
    reason = 'the aggregators are ' .. lag .. ' ms behind the heartbeat queue'
  end
  reason = reason .. ' (stopped aggregators, a backlog, or RabbitMQ or Redis out of reach);'
    .. ' expiries are held'
  redis.call('HSET', K_OBSERVER, 'state', 'degraded', 'since', NOW, 'reason', reason)
  observer_event('observer.degraded', 'ok', reason, '')
elseif lag <= DEGRADED_AFTER / 2 and obs[1] == 'degraded' then  -- hysteresis: no flapping
  local down = NOW - tonumber(obs[2])
  recovered_at = NOW
  redis.call('HSET', K_OBSERVER, 'state', 'ok', 'since', NOW, 'recovered_at', NOW,
    'reason', 'caught up')
  observer_event('observer.recovered', 'degraded',
    'caught up after ' .. down .. ' ms; instances last heard before now get ' .. GRACE
    .. ' ms of grace', ',"degraded_ms":' .. down)
end

-- due deadlines, up to the watermark ---------------------------------------------------------
-- The mass-expiry guard ----------------------------------------------------------------------
-- The candidates to be failing in each scope, found once per step: the suspects and recent
-- deaths (K_NOTALIVE) and the overdue deadlines, grouped by service and zone. (Each scope a
-- step counts then costs its own candidates, not every overdue instance anywhere again.)
local by_scope

local function candidates(scope)
  if not by_scope then
    by_scope = {}
    local seen = {}
    local function add(m)
      if seen[m] then return end
      seen[m] = true
      local r = rec_get(m)
      if not r then return end
      for _, sc in ipairs({'service:' .. r.svc, r.zone and 'zone:' .. r.zone or nil}) do
        local list = by_scope[sc]
        if not list then
          list = {}
          by_scope[sc] = list
        end
        list[#list + 1] = m
      end
    end
    for _, m in ipairs(redis.call('ZRANGE', K_NOTALIVE, '(' .. (NOW - MASS_WINDOW), '+inf',
        'BYSCORE')) do
      add(m)
    end
    for _, m in ipairs(dl_due(NOW, 1000000000)) do add(m) end
  end
  return by_scope[scope] or {}
end

-- A scope's instances that count (alive, suspect, or dead within the window) and those of
-- them failing (suspect, recently dead, or alive but overdue: after a long hold, a whole burst
-- can become due in one step; overdue is what the deadline index says, the same index the
-- bound in cannot_trip counts). The first number is K_SCOPES' count (alive or suspect) plus the
-- recent deaths; the failing ones are found among the candidates above and the dying one.
local function failing_in(scope, dying)
  local colon = string.find(scope, ':', 1, true)
  local by_zone, name = string.sub(scope, 1, colon - 1) == 'zone', string.sub(scope, colon + 1)
  local total = tonumber(redis.call('HGET', K_SCOPES, scope) or 0)
  local failing, names, seen = 0, {}, {}
  local list = {dying}
  for _, m in ipairs(candidates(scope)) do list[#list + 1] = m end
  for _, m in ipairs(list) do
    if not seen[m] then
      seen[m] = true
      local r = rec_get(m)
      if r and (by_zone and r.zone == name or not by_zone and r.svc == name) then
        local recent = r.state == 'dead' and tonumber(r.since) > NOW - MASS_WINDOW
        if recent then total = total + 1 end
        local overdue = r.state == 'alive' and (m == dying or dl_score(m) <= NOW)
        if recent or r.state == 'suspect' or overdue then
          failing = failing + 1
          names[#names + 1] = m
        end
      end
    end
  end
  return total, failing, names
end

local function trip(scope, total, failing, names)
  redis.call('HSET', K_GUARD, scope, string.format('%d %d', NOW, NOW))
  local kind_name = string.find(scope, ':', 1, true)
  local rk = 'mass-expiry.' .. string.sub(scope, 1, kind_name - 1) .. '.'
    .. string.sub(scope, kind_name + 1)
  local svc = ''
  if string.sub(scope, 1, 8) == 'service:' then svc = string.sub(scope, 9) end
  local reason = failing .. ' of ' .. total .. ' instances of ' .. scope .. ' failing within '
    .. MASS_WINDOW .. ' ms (more than ' .. math.floor(MASS_SHARE * 100) .. '%, at least '
    .. MASS_MIN .. '): their dead events are held until `hbbus guard release`'
  local evid = string.sub(redis.sha1hex('mass-expiry|' .. scope .. '|' .. NOW .. '|' .. P), 1, 24)
  local body = '{"v":1,"id":"' .. evid .. '","kind":"mass-expiry","service":"' .. svc
    .. '","instance":"","incarnation":"","seq":0,"ord":' .. NOW .. ',"at_ms":' .. NOW
    .. ',"last_seen_ms":0,"ttl_ms":0,"prev":"ok","scope":"' .. scope .. '","reason":'
    .. cjson.encode(reason) .. ',"instances":' .. cjson.encode(names)
    .. ',"meta":{"total":' .. total .. ',"failing":' .. failing .. '}}'
  record_event('guard', evid, NOW, rk, body, false)
end

-- The scope that holds this death, or nil: a tripped guard, or one this death trips.
-- Counting a scope reads every member, so each scope is counted at most once per step: a
-- death judged later in the same step was already counted as failing (it was overdue), so
-- the count cannot have grown since. This keeps a wave of deaths from costing
-- deaths x members.
local untripped = {}

-- Whether a scope cannot trip, known without reading its members: its failing count is at
-- most every suspect and recent death anywhere plus everything due now, and its total at
-- least its members less every old death and departure anywhere. Only a scope for which
-- these bounds leave the question open is counted member by member (a small service, or a
-- real wave), so a death in a 100k-instance service costs a few ZCOUNTs, not 100k reads.
-- The set of a scope's members of the earlier layout not moved yet (see migrate_one).
local function old_members(scope)
  if string.sub(scope, 1, 8) == 'service:' then return P .. 'svc:' .. string.sub(scope, 9) end
  return P .. scope
end

local function cannot_trip(scope)
  if not notalive_complete then return false end
  local failing = redis.call('ZCOUNT', K_NOTALIVE, '(' .. (NOW - MASS_WINDOW), '+inf')
    + dl_count_upto(NOW) + 1
  if failing < MASS_MIN then return true end
  local total = tonumber(redis.call('HGET', K_SCOPES, scope) or 0)
  if OLD then  -- and at least those not moved yet, less every old death and departure
    total = total + redis.call('SCARD', old_members(scope))
      - redis.call('ZCOUNT', K_NOTALIVE, '-inf', NOW - MASS_WINDOW)
  end
  return failing <= MASS_SHARE * total
end

local function guard(id, svc, zone)
  local scopes = {'service:' .. svc}
  if zone and zone ~= '' then scopes[2] = 'zone:' .. zone end
  rec_flush()  -- K_SCOPES counts the deaths judged earlier in this step as such
  for _, scope in ipairs(scopes) do
    if redis.call('HEXISTS', K_GUARD, scope) == 1 then return scope end
  end
  for _, scope in ipairs(scopes) do
    if not untripped[scope] and cannot_trip(scope) then
      untripped[scope] = true
    end
    if not untripped[scope] then
      if OLD then  -- its records of the earlier layout, moved now, count in K_SCOPES
        for _, m in ipairs(redis.call('SMEMBERS', old_members(scope))) do rec_get(m) end
        rec_flush()
      end
      local total, failing, names = failing_in(scope, id)
      if failing >= MASS_MIN and failing > MASS_SHARE * total then
        trip(scope, total, failing, names)
        return scope
      end
      untripped[scope] = true
    end
  end
  return nil
end

-- Tripped guards: released at a limited rate after a hold time (if configured), and over
-- once nothing is held any more and the window has passed.
local function tend_guards()
  local g = redis.call('HGETALL', K_GUARD)
  for i = 1, #g, 2 do
    local scope, sp = g[i], string.find(g[i + 1], ' ', 1, true)
    local tripped = tonumber(string.sub(g[i + 1], 1, sp - 1))
    local last_release = tonumber(string.sub(g[i + 1], sp + 1))
    local held_key = P .. 'held:' .. scope
    if RELEASE_AFTER > 0 and NOW - tripped >= RELEASE_AFTER
        and NOW - last_release >= RELEASE_EVERY then
      local oldest = redis.call('ZRANGE', held_key, 0, 0)
      if oldest[1] then
        release_one(scope, oldest[1])
        redis.call('HSET', K_GUARD, scope, string.format('%d %d', tripped, NOW))
      end
    end
    if redis.call('ZCARD', held_key) == 0 and NOW - tripped > MASS_WINDOW then
      redis.call('HDEL', K_GUARD, scope)
    end
  end
end
tend_guards()

local function record_of(id, r)
  return {svc = r[5], inst = r[6], inc = r[7], seq = r[8], last = r[2], ttl = r[3],
    meta = meta_of(id), ord = r[9]}
end

-- Flapping instances that have been stable long enough: one `stable` event, and the state
-- failover last heard of is brought up to date (a `dead` or `recovered`) if it changed.
local function settle_flapping()
  for _, id in ipairs(redis.call('ZRANGE', K_FLAPCHECK, '-inf', NOW, 'BYSCORE', 'LIMIT', 0, 100)) do
    redis.call('ZREM', K_FLAPCHECK, id)
    local r = rec_hmget(id, 'state', 'last', 'ttl', 'since', 'svc', 'inst', 'inc', 'seq', 'ord',
      'flapping', 'pub')
    if r[1] and r[10] == '1' then
      rec_set(id, 'flapping', '', 'flips', '')
      local rec = record_of(id, r)
      emit(id, 'stable', 'flapping', rec, false)
      local now_state = r[1] == 'dead' and 'dead' or 'alive'
      if r[1] ~= 'left' and now_state ~= (r[11] or 'alive') then
        emit(id, now_state == 'dead' and 'dead' or 'recovered', 'flapping', rec, false)
      end
      rec_set(id, 'ord', rec.ord)
    end
  end
end

local function judge(id, r, horizon)
  local state, last, ttl = r[1], tonumber(r[2]), tonumber(r[3])
  if last < recovered_at then  -- not heard since the observer recovered: grace first
    local grace_end = recovered_at + math.max(ttl, GRACE)
    if grace_end > horizon then
      dl_add(id, grace_end)
      return
    end
  end
  local due = next_due(state, last, r[10], ttl, r[14])
  if due > horizon then
    dl_add(id, due)
    return
  end
  local rec = record_of(id, r)
  local window_end = maintenance_until(rec.svc, rec.inst)
  local muted = window_end > 0
  if last + ttl <= horizon then
    local held = nil
    if not muted then held = guard(id, rec.svc, r[12]) end
    emit(id, 'dead', state, rec, muted or held ~= nil, held)
    rec_set(id, 'state', 'dead', 'since', NOW, 'ord', rec.ord,
      'muted', (muted or held) and '1' or '0', 'held', held or '')
    redis.call('ZADD', K_NOTALIVE, NOW, id)
    if held then redis.call('ZADD', P .. 'held:' .. held, NOW, id) end
    -- muted: look again when the window ends, and announce the death then if it still holds
    dl_add(id, muted and window_end or NOW + RETENTION)
  else
    emit(id, 'suspect', state, rec, muted)
    rec_set(id, 'state', 'suspect', 'since', NOW, 'ord', rec.ord, 'muted', muted and '1' or '0')
    redis.call('ZADD', K_NOTALIVE, NOTALIVE_SUSPECT, id)
    dl_add(id, last + ttl)
  end
end

-- A death kept quiet by maintenance: announce it once the window is over.
local function unmute(id, r)
  local window_end = maintenance_until(r[5], r[6])
  if window_end > 0 then
    dl_add(id, window_end)
    return
  end
  local rec = record_of(id, r)
  emit(id, 'dead', 'maintenance', rec, false)
  rec_set(id, 'since', NOW, 'ord', rec.ord, 'muted', '0')
  redis.call('ZADD', K_NOTALIVE, NOW, id)
  dl_add(id, NOW + RETENTION)
end

settle_flapping()

local horizon = NOW
if wm and wm < horizon then horizon = wm end
if not wm then horizon = -1 end  -- nobody has caught up: judge nobody
local due = {}
if horizon >= 0 then
  due = dl_due(horizon, limit)
end
for _, id in ipairs(due) do
  local r = rec_hmget(id, 'state', 'last', 'ttl', 'since', 'svc', 'inst', 'inc', 'seq', 'ord',
    'ivl', 'muted', 'zone', 'held', 'sus')
  if not r[1] then
    purge(id)
  elseif r[1] == 'alive' or r[1] == 'suspect' then
    judge(id, r, horizon)
  elseif r[1] == 'dead' and r[11] == '1' and (r[13] or '') == '' then
    unmute(id, r)
  else
    local purge_at = tonumber(r[4]) + RETENTION
    if purge_at > NOW then
      dl_add(id, purge_at)
    else
      purge(id)
    end
  end
end

local nxt, upcoming = -1, -1
rec_flush()
dl_exact_head()
local d = redis.call('ZRANGE', K_DLMIN, 0, 0, 'WITHSCORES')
if d[2] then nxt = tonumber(d[2]) end
local old_next = OLD and redis.call('ZRANGE', K_DEADLINES, 0, 0, 'WITHSCORES') or {}
if old_next[2] and (nxt == -1 or tonumber(old_next[2]) < nxt) then nxt = tonumber(old_next[2]) end
if nxt ~= -1 and nxt <= NOW then  -- past, waiting for the watermark: and the next one to come?
  -- the first of the buckets not due yet, and the first deadline after now of those that are
  -- (past 256 of them, an early probe does no harm: now + 1)
  d = redis.call('ZRANGE', K_DLMIN, '(' .. NOW, '+inf', 'BYSCORE', 'LIMIT', 0, 1, 'WITHSCORES')
  if d[2] then upcoming = tonumber(d[2]) end
  if OLD then
    d = redis.call('ZRANGE', K_DEADLINES, '(' .. NOW, '+inf', 'BYSCORE', 'LIMIT', 0, 1,
      'WITHSCORES')
    if d[2] and (upcoming == -1 or tonumber(d[2]) < upcoming) then upcoming = tonumber(d[2]) end
  end
  local past = redis.call('ZRANGE', K_DLMIN, '-inf', NOW, 'BYSCORE', 'LIMIT', 0, 257)
  if #past > 256 then
    upcoming = NOW + 1
  else
    for _, b in ipairs(past) do
      d = redis.call('ZRANGE', P .. 'dl:' .. b, '(' .. NOW, '+inf', 'BYSCORE', 'LIMIT', 0, 1,
        'WITHSCORES')
      if d[2] and (upcoming == -1 or tonumber(d[2]) < upcoming) then upcoming = tonumber(d[2]) end
    end
  end
end
table.insert(out, 1, upcoming)
table.insert(out, 1, nxt)
table.insert(out, 1, NOW)
return out
