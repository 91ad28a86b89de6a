-- The routing table of one service (hbbus.routing). One script, one operation per call:
-- every change is atomic with the table's version, its fencing epoch and its primary.
--
-- KEYS[1] routes hash (instance -> JSON entry)   KEYS[2] state hash (version, epoch, primary)
-- KEYS[3] promotion hash                          KEYS[4] index set of routed services
-- KEYS[5] the bucket hash holding the instance's record   KEYS[6] its alive key of the
-- earlier layout (begin and abort: whether the instance is alive)
-- ARGV[1] operation   ARGV[2] service   ARGV[3] instance   ARGV[4..] below
--
-- Safety rule: at most one entry is a routable primary, the state's `primary`; an instance that
-- claims to be primary while another one is (an old primary back from the dead) is fenced, not
-- routable, until a promotion action made it a replica (`unfence`).

local OP, SVC, INST = ARGV[1], ARGV[2], ARGV[3]
-- Redis time, one clock for every worker
local T = redis.call('TIME')
local NOW = tonumber(T[1]) * 1000 + math.floor(tonumber(T[2]) / 1000)
local K_ROUTES, K_STATE, K_PROMO, K_INDEX = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
-- the reason of the fence on a dead primary that came back while a promotion replaces it
local PROMOTING = 'a promotion is replacing it'

-- Whether INST is alive: its record (packed as hbbus/lua/common.lua describes: state first,
-- as a letter, last and ttl fourth and fifth) says alive or suspect with last + ttl still ahead, or, for a
-- record of the earlier layout not moved yet, its alive key exists.
local function is_alive()
  if redis.call('EXISTS', KEYS[6]) == 1 then return true end
  local raw = redis.call('HGET', KEYS[5], SVC .. '/' .. INST)
  if not raw then return false end
  local state, last, ttl = string.match(raw,
    '^([^\t]*)\t[^\t]*\t[^\t]*\t([^\t]*)\t([^\t]*)\t')
  return (state == 'a' or state == 's') and tonumber(last) + tonumber(ttl) > NOW
end

local function load_entry(inst)
  local raw = redis.call('HGET', K_ROUTES, inst)
  if raw then return cjson.decode(raw) end
  return nil
end

local function state()
  local s = redis.call('HMGET', K_STATE, 'primary', 'epoch', 'version')
  return s[1] or '', tonumber(s[2]) or 0, tonumber(s[3]) or 0
end

local function same(a, b)
  if a == nil then return false end
  return a.endpoint == b.endpoint and a.role == b.role and a.weight == b.weight
    and a.routable == b.routable and a.fenced == b.fenced
end

-- store entry e for inst; bump the version when what a router sees changed
local function save(inst, old, e)
  if old and old.routable == e.routable and old.since_ms then
    e.since_ms = old.since_ms
  else
    e.since_ms = NOW
  end
  redis.call('HSET', K_ROUTES, inst, cjson.encode(e))
  redis.call('SADD', K_INDEX, SVC)
  if same(old, e) then
    local _, _, version = state()
    return 0, version
  end
  return 1, redis.call('HINCRBY', K_STATE, 'version', 1)
end

local function result(changed, version)
  local primary, epoch = state()
  return {changed, version, epoch, primary}
end

-- ARGV[4] endpoint  [5] role  [6] weight  [7] load ('' none)  [8] event ord
local function upsert()
  local old = load_entry(INST)
  local primary, epoch = state()
  local role, ord = ARGV[5], tonumber(ARGV[8])
  -- a promotion made this instance a replica after the state this event describes
  if role == 'primary' and old and old.cleared_ord and ord <= old.cleared_ord then
    role = 'replica'
  end
  -- the primary of record stays the primary whatever an older event says: only a commit
  -- changes who it is
  if primary == INST then role = 'primary' end
  local fenced, reason = old ~= nil and old.fenced == true, ''
  if fenced then reason = old.reason or 'fenced' end
  -- the dead primary a promotion is replacing: never routable again until made a replica
  local promo_old = redis.call('HGET', K_PROMO, 'old')
  if promo_old == INST and not fenced then
    fenced, reason = true, PROMOTING
  end
  if role == 'primary' and not fenced then
    if primary == '' then
      primary = INST
      redis.call('HSET', K_STATE, 'primary', INST)
    elseif primary ~= INST then
      fenced = true
      reason = 'claims primary while ' .. primary .. ' is (epoch ' .. epoch .. ')'
    end
  end
  local e = {endpoint = ARGV[4], role = role, weight = tonumber(ARGV[6]),
    routable = not fenced, fenced = fenced, reason = reason, ord = ord}
  if ARGV[7] ~= '' then e.load = tonumber(ARGV[7]) end
  if old then e.cleared_ord = old.cleared_ord end
  return result(save(INST, old, e))
end

-- change INST's entry with fn(copy), if it has one
local function modify(fn)
  local old = load_entry(INST)
  if not old then return result(0, select(3, state())) end
  local e = cjson.decode(cjson.encode(old))
  fn(e, old)
  return result(save(INST, old, e))
end

-- ARGV[4] why
local function remove()
  return modify(function(e)
    e.routable = false
    if not e.fenced then e.reason = ARGV[4] end
  end)
end

-- Keep an instance out of routing until `unfence` (a replica resyncing). ARGV[4] why
local function fence()
  return modify(function(e) e.fenced, e.routable, e.reason = true, false, ARGV[4] end)
end

-- ARGV[4] ord of the event after whose state the instance was made a replica
local function unfence()
  return modify(function(e, old)
    e.fenced, e.routable, e.role, e.reason = false, true, 'replica', ''
    e.cleared_ord = math.max(tonumber(old.cleared_ord) or 0, tonumber(ARGV[4]))
  end)
end

local function promotion()
  local flat = redis.call('HGETALL', K_PROMO)
  local p = {}
  for i = 1, #flat, 2 do p[flat[i]] = flat[i + 1] end
  return p
end

-- Take the promotion lock for the dead primary INST. ARGV[4] owner  [5] lease ms.
-- The lock's token is the new epoch: every later step names it and fails once it is not the
-- current promotion's. A lock whose owner stopped renewing it is taken over (resumed).
local function begin()
  local owner, lease = ARGV[4], tonumber(ARGV[5])
  local p = promotion()
  if p.epoch then
    if tonumber(p['until']) > NOW and p.owner ~= owner then
      return {'busy', tonumber(p.epoch), p.old, p.candidate or ''}
    end
    redis.call('HSET', K_PROMO, 'owner', owner, 'until', NOW + lease)
    return {'resume', tonumber(p.epoch), p.old, p.candidate or ''}
  end
  local primary, epoch = state()
  if primary ~= INST then
    return {'not-primary', epoch, primary, redis.call('HGET', K_STATE, 'from') or ''}
  end
  if is_alive() then return {'alive', epoch, primary, ''} end
  epoch = redis.call('HINCRBY', K_STATE, 'epoch', 1)
  redis.call('HSET', K_PROMO, 'epoch', epoch, 'old', INST, 'owner', owner,
    'until', NOW + lease, 'started', NOW)
  return {'begin', epoch, INST, ''}
end

local function holds(p, epoch, owner)
  return p.epoch and tonumber(p.epoch) == epoch and p.owner == owner
end

-- Renew the lock and record a step. ARGV[4] epoch  [5] owner  [6] lease ms  [7] field  [8] value
local function step()
  local p = promotion()
  if not holds(p, tonumber(ARGV[4]), ARGV[5]) then return 0 end
  redis.call('HSET', K_PROMO, 'until', NOW + tonumber(ARGV[6]))
  if ARGV[7] ~= '' then redis.call('HSET', K_PROMO, ARGV[7], ARGV[8]) end
  return 1
end

-- Make INST (the candidate) the primary. ARGV[4] epoch  [5] owner  [6] old primary
local function commit()
  local epoch = tonumber(ARGV[4])
  if not holds(promotion(), epoch, ARGV[5]) then return {0, 0, 0, ''} end
  redis.call('HSET', K_STATE, 'primary', INST, 'from', ARGV[6], 'promoted_ms', NOW)
  local cand = load_entry(INST) or {endpoint = '', weight = 1}
  local e = cjson.decode(cjson.encode(cand))
  e.role, e.routable, e.fenced, e.reason = 'primary', true, false, ''
  save(INST, cand, e)
  local old = load_entry(ARGV[6])
  if old and ARGV[6] ~= INST then
    local o = cjson.decode(cjson.encode(old))
    o.routable, o.fenced = false, true
    o.reason = 'demoted at epoch ' .. epoch .. ': the primary is ' .. INST
    save(ARGV[6], old, o)
  end
  redis.call('DEL', K_PROMO)
  local _, _, version = state()
  return {1, version, epoch, INST}
end

-- Give the lock up without a promotion; INST is the old primary. ARGV[4] epoch  [5] owner
-- The old primary stays the primary: if it came back meanwhile, the fence this promotion put
-- on it goes, and it is routable again while it is alive.
local function abort()
  local p = promotion()
  if not holds(p, tonumber(ARGV[4]), ARGV[5]) then return 1 end
  redis.call('DEL', K_PROMO)
  local old = load_entry(p.old)
  if old and old.fenced and old.reason == PROMOTING then
    local e = cjson.decode(cjson.encode(old))
    e.fenced, e.reason = false, ''
    e.routable = p.old == INST and is_alive()
    save(p.old, old, e)
  end
  return 1
end

local ops = {upsert = upsert, remove = remove, fence = fence, unfence = unfence, begin = begin, step = step,
  commit = commit, abort = abort}
return ops[OP]()
