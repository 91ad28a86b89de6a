-- Apply one batch of heartbeats. ARGV[S] aggregator id ('': not an aggregator), ARGV[S + 1]
-- newest probe stamp in the batch (0: none), ARGV[S + 2] = n, then one value per heartbeat:
-- bucket (see bucket_of), service, instance, incarnation, seq, interval_ms, ttl_ms, status,
-- zone ('' if none) and meta (JSON), joined by tabs (one argument per heartbeat: packing ten per heartbeat cost the
-- client more than the script costs Redis). Names, numbers and the status never hold a tab,
-- and meta, which comes last, is compact JSON that escapes control characters anyway.
-- A seq not above the stored one of the same incarnation is stale and ignored; a heartbeat of
-- the incarnation before the current one is stale too (reordering between aggregators).
-- seq 0 means "unordered" (one-shot senders such as `hbbus send` from cron): always applied.
-- After the batch, the aggregator's watermark entry becomes "probe seen": every heartbeat it
-- was handed before that probe is now applied. A new aggregator registers with probe 0.
-- After the heartbeats: the epoch the aggregator saw last ('' at first), a fresh one to use if
-- Redis has none, and how long a resync lasts (ms).
-- Returns {stale_count, epoch, evid, routing_key, body, ...} for the events to publish now.
local agg, probe, n = ARGV[S], tonumber(ARGV[S + 1]), tonumber(ARGV[S + 2])
local B = S + 3  -- the first heartbeat
local stale = 0

-- The store's epoch: a random id kept in Redis. If it is gone while the aggregator had seen
-- one, Redis lost its data (a restart without persistence, a flush): for a while, instances
-- that reappear are a resync, not news, and their `joined` events say so.
local epoch_key, seen_epoch, fresh_epoch = P .. 'epoch', ARGV[B + n], ARGV[B + 1 + n]
local epoch = redis.call('GET', epoch_key)
if not epoch then
  epoch = fresh_epoch
  redis.call('SET', epoch_key, epoch)
  mark_notalive_if_empty()  -- a store born now (new, or Redis lost its data)
end
if seen_epoch ~= '' and seen_epoch ~= epoch and NOW >= RESYNC_UNTIL then
  -- gone, or re-created by another client since we saw it: the data was lost
  RESYNC_UNTIL = NOW + tonumber(ARGV[B + 2 + n])
  redis.call('HSET', K_OBSERVER, 'resync_until', RESYNC_UNTIL, 'resynced_at', NOW)
end

local function verdict(state, cinc, cseq, pinc, inc, seq, st)
  if not state then
    if st == 'left' then return false, false, false end
    return true, 'joined', false
  end
  if inc ~= cinc then
    if inc == pinc then return false, false, false end
    if state == 'alive' or state == 'suspect' then return true, 'restarted', true end
    if state == 'dead' then return true, 'recovered', true end
    return true, 'joined', true
  end
  if tonumber(seq) <= tonumber(cseq) and seq ~= '0' then return false, false, false end
  if state == 'dead' then return true, 'recovered', false end
  if state == 'suspect' then return true, 'alive', false end
  if state == 'left' then return true, 'joined', false end
  return true, false, false
end

-- Adaptive deadlines (opt-in per service): an exponentially weighted mean and variance of the
-- inter-arrival gaps; dead after clamp(max(mean + k * sigma, 1.6 * longest of the last 20
-- gaps), floor, ceiling) with sigma at least mean / 4; suspect after clamp(mean + 2 * sigma)
-- when that comes first. The declared TTL (clamped) until 20 gaps are known.
-- hbbus/detect.py is the same maths in Python (`hbbus why`, the tests): keep them together.
local ALPHA, WARMUP, KEEP, SIGMA_FLOOR, ENVELOPE = 0.125, 20, 20, 0.25, 1.6
local detectors = {}
local function detector(svc)
  if detectors[svc] == nil then
    local v = redis.call('HGET', K_DETECTORS, svc)
    detectors[svc] = false
    if v then
      local k, floor, ceil = string.match(v, '^(%S+) (%S+) (%S+)$')
      detectors[svc] = {tonumber(k), tonumber(floor), tonumber(ceil)}
    end
  end
  return detectors[svc]
end

local function clamp(x, lo, hi) return math.max(lo, math.min(hi, x)) end

local function adapt(fields, det, cur, continued, dttl, ivl)
  local n, m, v = tonumber(cur[10]) or 0, tonumber(cur[11]) or 0, tonumber(cur[12]) or 0
  local gaps = cur[13] or ''
  if continued and cur[9] then
    local gap = NOW - tonumber(cur[9])
    if n == 0 then
      m, v = gap, 0
    else
      local d = gap - m
      m = m + ALPHA * d
      v = (1 - ALPHA) * (v + ALPHA * d * d)
    end
    n = n + 1
    local list = {}
    for g in string.gmatch(gaps, '%d+') do list[#list + 1] = g end
    list[#list + 1] = string.format('%d', gap)
    while #list > KEEP do table.remove(list, 1) end
    gaps = table.concat(list, ' ')
  end
  local longest = 0
  for g in string.gmatch(gaps, '%d+') do longest = math.max(longest, tonumber(g)) end
  for _, kv in ipairs({{'gn', n}, {'gm', string.format('%.1f', m)},
                       {'gv', string.format('%.1f', v)}, {'gaps', gaps}}) do
    fields[#fields + 1] = kv[1]
    fields[#fields + 1] = kv[2]
  end
  local k, floor, ceil = det[1], det[2], det[3]
  if n < WARMUP then return clamp(tonumber(dttl), floor, ceil), '' end
  local sigma = math.max(math.sqrt(v), m * SIGMA_FLOOR)
  local dead_after = math.floor(clamp(math.max(m + k * sigma, ENVELOPE * longest), floor, ceil))
  local suspect_after = math.floor(clamp(m + 2 * sigma, floor, ceil))
  if suspect_after >= dead_after then return dead_after, '' end
  return dead_after, suspect_after
end

-- The record's fields one heartbeat reads; adapt() reads cur[9..13].
local READ = {'state', 'inc', 'seq', 'pinc', 'ord', 'muted', 'held', 'zone', 'last', 'gn', 'gm',
  'gv', 'gaps', 'ivl', 'dttl', 'ttl', 'sus', 'status', 'meta'}

-- The fields that change: a steady heartbeat of a known instance changes seq and last.
local function changes(cur, first, svc, inst, inc, seq, ivl, dttl, st, newstate, zone)
  local fields = {'seq', seq, 'last', NOW}
  local function put(name, value, old)
    if value ~= (old or '') then
      fields[#fields + 1] = name
      fields[#fields + 1] = value
    end
  end
  if first then
    fields[#fields + 1] = 'first'
    fields[#fields + 1] = NOW
  end
  put('inc', inc, cur[2])
  put('ivl', ivl, cur[14])
  put('dttl', dttl, cur[15])
  put('status', st, cur[18])
  put('state', newstate, cur[1])
  put('zone', zone, cur[8])
  if (cur[6] or '0') ~= '0' then put('muted', '0', cur[6]) end
  put('held', '', cur[7])
  return fields
end

local FIELDS = '^' .. string.rep('([^\t]*)\t', 9) .. '(.*)$'

-- A steady heartbeat: an instance alive, of the same incarnation, with a newer seq and
-- nothing else changed (interval, ttl, status ok, zone, meta), no adaptive detector, and none
-- of the fields after the meta that a heartbeat would change (a dttl or sus of its own, a
-- status, muted, held; pinc, pub and the flap fields stay as they are). Only its seq, last
-- and since (kept as a distance from last) change: the packed record is rewritten in place,
-- neither unpacked nor counted again ('a': alive, see CODE). Anything else takes the general
-- path, which makes the same record (tests/test_store.py checks both).
local TAIL_FIELD = '([^\t]*)\t?'

local function steady(id, svc, inc, seq, ivl, ttl, st, zone, meta)
  if st ~= 'ok' or recs[id] ~= nil or detector(svc) then return false end
  local key = bucket_of(id)
  local raw = redis.call('HGET', key, id)
  if not raw then return false end
  local state, cinc, cseq, last, cttl, civl, ord, first, since, czone, hist, cmeta =
    string.match(raw, RPAT)
  if state ~= 'a' or cinc ~= inc or cttl ~= ttl or civl ~= ivl or czone ~= zone then
    return false
  end
  if cmeta ~= meta then  -- the meta changed, or fields follow it (pinc, dttl, sus, ...)
    local n = #meta
    if string.sub(cmeta, 1, n + 1) ~= meta .. '\t' then return false end
    local _, dttl, sus, status, _, muted, held = string.match(string.sub(cmeta, n + 2),
      '^' .. string.rep(TAIL_FIELD, 7))
    if dttl ~= '' or sus ~= '' or status ~= '' or (muted ~= '' and muted ~= '0')
        or held ~= '' then
      return false
    end
  end
  if seq ~= '0' and tonumber(seq) <= tonumber(cseq) then return false end  -- stale: counted there
  if since ~= '' then since = tonumber(since) + NOW - tonumber(last) end
  redis.call('HSET', key, id,
    table.concat({state, inc, seq, NOW, ttl, ivl, ord, first, since, zone, hist, cmeta}, '\t'))
  dl_later(id, next_due('alive', NOW, ivl, ttl, ''))
  return true
end

for i = 0, n - 1 do
  local b, svc, inst, inc, seq, ivl, ttl, st, zone, meta = string.match(ARGV[B + i], FIELDS)
  local id = svc .. '/' .. inst
  bucket_ids[id] = b
  if not steady(id, svc, inc, seq, ivl, ttl, st, zone, meta) then
    local cur = rec_hmget(id, unpack(READ))
    local state = cur[1]
    local accept, kind, newinc = verdict(state, cur[2], cur[3], cur[4], inc, seq, st)
    if not accept then
      stale = stale + 1
    else
      local newstate = 'alive'
      if st == 'left' then
        newstate = 'left'
        if state ~= 'left' or newinc then kind = 'left' else kind = false end
      end
      local dttl = ttl
      local sus = ''
      local det = detector(svc)
      local fields = changes(cur, not state, svc, inst, inc, seq, ivl, dttl, st, newstate, zone)
      if det then
        local continued = (state == 'alive' or state == 'suspect') and not newinc
        ttl, sus = adapt(fields, det, cur, continued, dttl, ivl)
      end
      if tostring(ttl) ~= (cur[16] or '') then
        fields[#fields + 1] = 'ttl'
        fields[#fields + 1] = ttl
      end
      if tostring(sus) ~= (cur[17] or '') then  -- sus is a number when adapted
        fields[#fields + 1] = 'sus'
        fields[#fields + 1] = sus
      end
      -- back from a death (or suspicion) that maintenance or the guard kept quiet: quiet too
      local muted = cur[6] == '1' and (kind == 'recovered' or kind == 'alive')
      if cur[7] and cur[7] ~= '' then  -- a held death is dropped: the instance came back
        redis.call('ZREM', P .. 'held:' .. cur[7], id)
      end
      if newinc then
        fields[#fields + 1] = 'pinc'
        fields[#fields + 1] = cur[2]
      end
      if kind then
        local rec = {svc = svc, inst = inst, inc = inc, seq = seq, last = NOW, ttl = ttl,
          meta = meta, ord = cur[5]}
        emit(id, kind, state or 'none', rec, muted)
        fields[#fields + 1] = 'since'
        fields[#fields + 1] = NOW
        fields[#fields + 1] = 'ord'
        fields[#fields + 1] = rec.ord
      end
      if meta ~= cur[19] then
        fields[#fields + 1] = 'meta'
        fields[#fields + 1] = meta
      end
      rec_set(id, unpack(fields))
      if newstate ~= state then
        if newstate == 'left' then
          redis.call('ZADD', K_NOTALIVE, 0, id)
        elseif state then
          redis.call('ZREM', K_NOTALIVE, id)
        end
      end
      if newstate == 'alive' then
        dl_add(id, next_due('alive', NOW, ivl, ttl, sus))
      else
        dl_add(id, NOW + RETENTION)
      end
    end
  end
end

if agg ~= '' then
  local entry = redis.call('HGET', K_OBSERVERS, agg)
  local seen_probe = 0
  if entry then
    seen_probe = tonumber(string.sub(entry, 1, string.find(entry, ' ', 1, true) - 1))
  end
  -- a probe can never vouch for the future (a clock step, a forged probe)
  local stamp = math.min(math.max(seen_probe, probe), NOW)
  redis.call('HSET', K_OBSERVERS, agg, string.format('%d %d', stamp, NOW))
end

rec_flush()
dl_touched = {}  -- deadlines moved later leave K_DLMIN early, never late (see dl_add)
table.insert(out, 1, epoch)
table.insert(out, 1, stale)
return out
