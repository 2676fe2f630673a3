-- Renew the leases of requests still being worked on (resets their idle time).
-- KEYS: tenant stream
-- ARGV: tenant base, group, consumer, then request ids
-- Returns per id: 'extended', 'not_leased' (already answered) or 'not_found'.
local stream = KEYS[1]
local base, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for i = 4, #ARGV do
  local fields = redis.call('HMGET', base .. 'req:' .. ARGV[i], 'entry', 'status')
  if not fields[2] then
    out[#out + 1] = 'not_found'
  elseif fields[2] ~= 'pending' then
    out[#out + 1] = 'not_leased'
  else
    local claimed = redis.call('XCLAIM', stream, group, consumer, 0, fields[1], 'JUSTID')
    out[#out + 1] = (#claimed > 0) and 'extended' or 'not_leased'
  end
end
return out
