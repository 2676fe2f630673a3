-- Shared by answer.lua, claim.lua, close.lua and extend.lua: record a request's final result once,
-- acknowledge its stream entry, and push the result to every waiting replica but `skip` (the
-- replica that answered: it resolves its own waiters itself; nil: push to all). The waiting
-- replicas are the request's `origin` (the one that enqueued it) and, only when the hash is
-- marked `watched`, the members of its watchers set (watch.lua: readers on other replicas).
-- A request stored before `origin` was kept has only the set.
-- Returns false when the request is unknown, 'duplicate' when it already has a result,
-- else its enqueued_at.
-- Takes `size` bytes off the tenant's queued bytes (enqueue.lua counted them up); never
-- below zero.
local function release_bytes(base, size)
  local usage = base .. 'usage'
  if redis.call('HINCRBY', usage, 'bytes', -size) < 0 then
    redis.call('HSET', usage, 'bytes', 0)
  end
end

local function finish(base, stream, group, replies_prefix, id, status, result, result_ttl, now,
                      skip)
  local req = base .. 'req:' .. id
  local fields = redis.call('HMGET', req, 'status', 'entry', 'session', 'enqueued_at', 'idem',
    'size', 'origin', 'watched')
  if not fields[1] then
    return false
  end
  if fields[1] ~= 'pending' then
    return 'duplicate'
  end
  release_bytes(base, tonumber(fields[6]) or redis.call('HSTRLEN', req, 'body'))
  redis.call('HSET', req, 'status', status, 'result', result, 'answered_at', now)
  redis.call('HDEL', req, 'body')
  redis.call('EXPIRE', req, result_ttl)
  redis.call('XACK', stream, group, fields[2])
  redis.call('XDEL', stream, fields[2])
  redis.call('SREM', base .. 'session:' .. fields[3] .. ':open', id)
  local origin = fields[7]
  if origin and origin ~= skip then
    redis.call('PUBLISH', replies_prefix .. origin, id .. '\n' .. result)
  end
  if fields[8] or not origin then
    local watchers = req .. ':w'
    for _, replica in ipairs(redis.call('SMEMBERS', watchers)) do
      if replica ~= skip and replica ~= origin then
        redis.call('PUBLISH', replies_prefix .. replica, id .. '\n' .. result)
      end
    end
    redis.call('DEL', watchers)
  end
  local idem = fields[5]
  if idem and redis.call('EXISTS', idem) == 1 then
    -- The key's last request answered: it now lives as long as the results (+ grace).
    if redis.call('HINCRBY', idem, 'open', -1) <= 0 then
      local grace = tonumber(redis.call('HGET', idem, 'grace')) or 0
      redis.call('EXPIRE', idem, tonumber(result_ttl) + grace)
    end
  end
  return fields[4]
end
