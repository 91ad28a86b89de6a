-- The reaper's step. ARGV[9] = limit.
-- 1. The outbox, oldest first: an event without a live lease (its publisher died or gave up)
--    is handed out again, unless an older event of the same instance is still pending.
-- 2. The watermark: the oldest probe stamp among live aggregators. Every heartbeat published
--    before it has been applied, so only deadlines at or below it may be judged. When it lags
--    more than degraded_after_ms (or no aggregator has caught up) the observer is degraded:
--    one observer.degraded event, expiries held; observer.recovered when it catches up, after
--    which instances last heard before the recovery get a fresh grace period.
-- 3. Due deadlines up to the watermark: alive -> suspect -> dead; dead or left records past
--    their retention are purged; a deadline that moved (a heartbeat came) is re-filed.
-- Returns {now_ms, next_deadline_ms or -1, evid, routing_key, body, ...}.
local limit, me = tonumber(ARGV[9]), ARGV[10]

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

local obs = redis.call('HMGET', K_OBSERVER, 'state', 'since', 'last_wm', 'recovered_at')
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
local function purge(id)
  redis.call('DEL', P .. 'inst:' .. id, P .. 'hist:' .. id, P .. 'alive:' .. id)
  redis.call('ZREM', K_DEADLINES, id)
  redis.call('SREM', K_INSTANCES, id)
end

local function record_of(r)
  return {svc = r[5], inst = r[6], inc = r[7], seq = r[8], last = r[2], ttl = r[3],
    meta = r[9], ord = r[10]}
end

local function judge(id, rkey, r, horizon)
  local state, last, ttl = r[1], tonumber(r[2]), tonumber(r[3])
  if last < recovered_at then  -- not heard since the observer recovered: grace first
    local grace_end = recovered_at + math.max(ttl, GRACE)
    if grace_end > horizon then
      redis.call('ZADD', K_DEADLINES, grace_end, id)
      return
    end
  end
  local due = next_due(state, last, r[11], ttl)
  if due > horizon then
    redis.call('ZADD', K_DEADLINES, due, id)
    return
  end
  local rec = record_of(r)
  local window_end = maintenance_until(rec.svc, rec.inst)
  local muted = window_end > 0
  if last + ttl <= horizon then
    emit(id, 'dead', state, rec, muted)
    redis.call('HSET', rkey, 'state', 'dead', 'since', NOW, 'ord', rec.ord,
      'muted', muted and '1' or '0')
    redis.call('DEL', P .. 'alive:' .. id)
    -- muted: look again when the window ends, and announce the death then if it still holds
    redis.call('ZADD', K_DEADLINES, muted and window_end or NOW + RETENTION, id)
  else
    emit(id, 'suspect', state, rec, muted)
    redis.call('HSET', rkey, 'state', 'suspect', 'since', NOW, 'ord', rec.ord,
      'muted', muted and '1' or '0')
    redis.call('ZADD', K_DEADLINES, last + ttl, id)
  end
end

-- A death kept quiet by maintenance: announce it once the window is over.
local function unmute(id, rkey, r)
  local window_end = maintenance_until(r[5], r[6])
  if window_end > 0 then
    redis.call('ZADD', K_DEADLINES, window_end, id)
    return
  end
  local rec = record_of(r)
  emit(id, 'dead', 'maintenance', rec, false)
  redis.call('HSET', rkey, 'since', NOW, 'ord', rec.ord, 'muted', '0')
  redis.call('ZADD', K_DEADLINES, NOW + RETENTION, id)
end

local horizon = NOW
if wm and wm < horizon then horizon = wm end
if not wm then horizon = -1 end  -- nobody has caught up: judge nobody
local due = {}
if horizon >= 0 then
  due = redis.call('ZRANGE', K_DEADLINES, '-inf', horizon, 'BYSCORE', 'LIMIT', 0, limit)
end
for _, id in ipairs(due) do
  local rkey = P .. 'inst:' .. id
  local r = redis.call('HMGET', rkey, 'state', 'last', 'ttl', 'since', 'svc', 'inst', 'inc',
    'seq', 'meta', 'ord', 'ivl', 'muted')
  if not r[1] then
    purge(id)
  elseif r[1] == 'alive' or r[1] == 'suspect' then
    judge(id, rkey, r, horizon)
  elseif r[1] == 'dead' and r[12] == '1' then
    unmute(id, rkey, r)
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
