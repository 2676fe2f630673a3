-- Renew the leases of requests still being worked on (resets their idle time; the lease
-- loses the tag of the long-poll that delivered it: its poller has it). A request
-- whose session expired is failed instead (session_expired) and reported 'not_leased', so
-- its poller stops working for nobody.
-- KEYS: tenant stream
-- ARGV: tenant base, group, consumer, replies prefix, result ttl, now,
--       session expired result json (with "__ID__" for the id), then request ids
-- Returns per id: 'extended', 'not_leased' (already answered, or failed) or 'not_found'.
local stream = KEYS[1]
local base, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local replies, result_ttl, now, session_gone = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local out = {}
for i = 8, #ARGV do
  local id = ARGV[i]
  local fields = redis.call('HMGET', base .. 'req:' .. id, 'entry', 'status', 'session')
  if not fields[2] then
    out[#out + 1] = 'not_found'
  elseif fields[2] ~= 'pending' then
    out[#out + 1] = 'not_leased'
  else
    local session = redis.call('HMGET', base .. 'session:' .. fields[3], 'status', 'expires_at')
    if session[1] ~= 'active' or tonumber(session[2]) <= tonumber(now) then
      local result = string.gsub(session_gone, '__ID__', id)
      finish(base, stream, group, replies, id, 'error', result, result_ttl, now)
      out[#out + 1] = 'not_leased'
    else
      local claimed = redis.call('XCLAIM', stream, group, consumer, 0, fields[1], 'JUSTID')
      if #claimed > 0 then
        -- Its poller has it: a report that its long-poll's answer was lost (release.lua)
        -- must not hand it back now.
        redis.call('HDEL', base .. 'req:' .. id, 'poll')
        out[#out + 1] = 'extended'
      else
        out[#out + 1] = 'not_leased'
      end
    end
  end
end
return out
