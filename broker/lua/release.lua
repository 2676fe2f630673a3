-- Hand leased requests back at once (their poller went away before it got them) by making
-- their entries look idle for longer than any lease, and announce the work again. The next
-- lease (lease.lua: a claim, or an enqueue's hand-off) re-delivers them: the reap lock is
-- lifted and the reap cursor reset, so that its scan starts at the oldest lease.
-- KEYS: tenant stream
-- ARGV: tenant base, group, consumer, idle ms, work channel, tenant id, then stream ids...
-- Request ids are passed, their entries looked up here.
local stream = KEYS[1]
local base, group, consumer, idle, channel, tenant = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local entries = {}
for i = 7, #ARGV do
  local req = base .. 'req:' .. ARGV[i]
  local fields = redis.call('HMGET', req, 'entry', 'status')
  if fields[1] and fields[2] == 'pending' then
    entries[#entries + 1] = fields[1]
    redis.call('HINCRBY', req, 'attempt', -1)
  end
end
if #entries > 0 then
  redis.call('XCLAIM', stream, group, consumer, 0, unpack(entries), 'IDLE', idle, 'JUSTID')
  redis.call('DEL', base .. 'reap', base .. 'reap:cursor')
  redis.call('PUBLISH', channel, tenant .. ' ' .. #entries)
end
return #entries
