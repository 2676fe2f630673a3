-- Shared by answer.lua, claim.lua and close.lua: record a request's final result once,
-- acknowledge its stream entry, and push the result to every waiting replica.
-- Returns false when the request is unknown, 'duplicate' when it already has a result,
-- else its enqueued_at.
local function finish(base, stream, group, replies_prefix, id, status, result, result_ttl, now)
  local req = base .. 'req:' .. id
  local fields = redis.call('HMGET', req, 'status', 'entry', 'session', 'enqueued_at')
  if not fields[1] then
    return false
  end
  if fields[1] ~= 'pending' then
    return 'duplicate'
  end
  redis.call('HSET', req, 'status', status, 'result', result, 'answered_at', now)
  redis.call('HDEL', req, 'body')
  redis.call('EXPIRE', req, result_ttl)
  redis.call('XACK', stream, group, fields[2])
  redis.call('XDEL', stream, fields[2])
  redis.call('SREM', base .. 'session:' .. fields[3] .. ':open', id)
  local watchers = req .. ':w'
  for _, replica in ipairs(redis.call('SMEMBERS', watchers)) do
    redis.call('PUBLISH', replies_prefix .. replica, id .. '\n' .. result)
  end
  redis.call('DEL', watchers)
  return fields[4]
end
