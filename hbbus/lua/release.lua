-- `hbbus guard release`: publish the deaths the mass-expiry guard holds. ARGV[S..] = scopes
-- ("service:<svc>", "zone:<zone>"); none: every tripped scope. The events wait in the outbox
-- for a reaper (this caller does not publish). Returns {released, scope, ...}.
NO_CLAIM = true
local scopes = {}
for i = S, #ARGV do scopes[#scopes + 1] = ARGV[i] end
if #scopes == 0 then
  local g = redis.call('HKEYS', K_GUARD)
  for _, scope in ipairs(g) do scopes[#scopes + 1] = scope end
end
local released, done = 0, {}
for _, scope in ipairs(scopes) do
  if redis.call('HEXISTS', K_GUARD, scope) == 1 then
    for _, id in ipairs(redis.call('ZRANGE', P .. 'held:' .. scope, 0, -1)) do
      released = released + release_one(scope, id)
    end
    redis.call('DEL', P .. 'held:' .. scope)
    redis.call('HDEL', K_GUARD, scope)
    done[#done + 1] = scope
  end
end
rec_flush()
dl_flush()
table.insert(done, 1, released)
return done
