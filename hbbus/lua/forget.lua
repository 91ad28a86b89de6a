-- `hbbus forget`: remove every trace of one instance. ARGV[S] = its id. Returns 1 if it was
-- known.
local id = ARGV[S]
local known = rec_get(id) and 1 or 0
purge(id)
rec_flush()
dl_flush()
return known
