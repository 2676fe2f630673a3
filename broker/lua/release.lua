-- Hand leased requests back at once by making their entries look idle for longer than any
-- lease, and announce the work again. The next lease (lease.lua: a claim, or an enqueue's
-- hand-off) re-delivers them: the reap lock is lifted and the reap cursor reset, so that its
-- scan starts at the oldest lease. Three kinds of caller:
-- * a long-poll that went away before it was answered (`Store.release`): its request ids are
--   given; they were never sent, so their delivery is not counted (attempt - 1);
-- * a poller that will not answer requests it holds, its calls given up at shutdown
--   (`Store.hand_back`, POST /leases/release): their ids are given, and their delivery
--   stays counted (the calls ran);
-- * a poller whose /pending answer never arrived whole (`Store.release_polls`): the poll
--   sets of those long-polls are given, and only the requests still leased under that poll
--   are handed back: unanswered, and with the poll's tag still on them (an extension, an
--   earlier release or a later delivery took it off). Their delivery stays counted.
-- Either way the tag goes, so nothing is handed back twice; a poll set is deleted once read.
-- KEYS: tenant stream, then the poll sets (none: the request ids are in ARGV)
-- ARGV: tenant base, group, consumer, idle ms, work channel, tenant id, then the tag of each
--       poll set in KEYS order ('<scope>:<poll id>'), or else 1 | 0 (the delivery is not
--       counted / is) and the request ids
-- Returns how many requests were handed back (poll sets), or per request id 'released',
-- 'not_leased' (answered, or failed) or 'not_found'.
local stream = KEYS[1]
local base, group, consumer, idle, channel, tenant = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local entries = {}

-- Hand back `id` if it is unanswered and, when `tag` is given, still leased under it; the
-- outcome for the caller that named it.
local function take(id, tag, uncount)
  local req = base .. 'req:' .. id
  local fields = redis.call('HMGET', req, 'entry', 'status', 'poll')
  if not fields[1] then
    return 'not_found'
  end
  if fields[2] == 'pending' and (not tag or fields[3] == tag) then
    entries[#entries + 1] = fields[1]
    if uncount then
      redis.call('HINCRBY', req, 'attempt', -1)
    end
    if fields[3] then
      redis.call('HDEL', req, 'poll')
    end
    return 'released'
  end
  return 'not_leased'
end

local out = nil
if #KEYS > 1 then
  for i = 2, #KEYS do
    local tag = ARGV[5 + i]
    for _, id in ipairs(redis.call('SMEMBERS', KEYS[i])) do
      take(id, tag, false)
    end
    redis.call('DEL', KEYS[i])
  end
else
  out = {}
  local uncount = ARGV[7] == '1'
  for i = 8, #ARGV do
    out[#out + 1] = take(ARGV[i], nil, uncount)
  end
end
if #entries > 0 then
  -- The arguments built whole: an `unpack` amid a call's arguments gives only one value.
  for first = 1, #entries, 1000 do  -- and unpack's bound on results
    local args = {stream, group, consumer, 0}
    for i = first, math.min(first + 999, #entries) do
      args[#args + 1] = entries[i]
    end
    args[#args + 1] = 'IDLE'
    args[#args + 1] = idle
    args[#args + 1] = 'JUSTID'
    redis.call('XCLAIM', unpack(args))
  end
  redis.call('DEL', base .. 'reap', base .. 'reap:cursor')
  redis.call('PUBLISH', channel, tenant .. ' ' .. #entries)
end
return out or #entries
