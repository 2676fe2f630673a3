-- Accept requests of one session atomically: stream entry + request hash + watcher, then
-- announce the tenant's new work. Returns the count accepted, -1 when the session is closed
-- or expired, -2 when the session would exceed its open-request limit, or, when the
-- idempotency key was seen before, the JSON list of the request ids it accepted then.
-- KEYS: session hash, session open set, tenant stream[, idempotency key]
-- ARGV: tenant base, tenant id, session id, replica id, now, request ttl, max open,
--       work channel, n, then n pairs of (request id, body json)
local session, open_set, stream = KEYS[1], KEYS[2], KEYS[3]
local base, tenant, session_id, replica = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, ttl, max_open = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local channel, n = ARGV[8], tonumber(ARGV[9])
local idempotency = KEYS[4]

if idempotency then
  local earlier = redis.call('GET', idempotency)
  if earlier then
    return earlier
  end
end

local status = redis.call('HMGET', session, 'status', 'expires_at')
if status[1] ~= 'active' or tonumber(status[2]) <= tonumber(now) then
  return -1
end
if redis.call('SCARD', open_set) + n > max_open then
  return -2
end
for i = 0, n - 1 do
  local id, body = ARGV[10 + 2 * i], ARGV[11 + 2 * i]
  local req = base .. 'req:' .. id
  local entry = redis.call('XADD', stream, '*', 'id', id)
  redis.call('HSET', req, 'status', 'pending', 'body', body, 'session', session_id,
    'enqueued_at', now, 'entry', entry, 'attempt', 0)
  redis.call('EXPIRE', req, ttl)
  redis.call('SADD', req .. ':w', replica)
  redis.call('EXPIRE', req .. ':w', ttl)
  redis.call('SADD', open_set, id)
end
redis.call('EXPIRE', open_set, ttl)
if idempotency then
  local ids = {}
  for i = 0, n - 1 do
    ids[#ids + 1] = ARGV[10 + 2 * i]
  end
  redis.call('SET', idempotency, cjson.encode(ids), 'EX', ttl)
end
redis.call('PUBLISH', channel, tenant .. ' ' .. n .. ' ' .. replica)
return n
