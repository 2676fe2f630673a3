-- Accept requests of one session atomically: stream entry + request hash + watcher, then
-- announce the tenant's new work. Returns the count accepted, -1 when the session is closed
-- or expired, -2 when the session would exceed its open-request limit, -3 / -4 when the
-- tenant would exceed its quota of requests in flight / of queued bytes, or, when the
-- idempotency key was seen before, the JSON list of the request ids it accepted then.
-- KEYS: session hash, session open set, tenant stream[, idempotency key]
-- ARGV: tenant base, tenant id, session id, replica id, now, request ttl, max open,
--       work channel, n, idempotency grace s, tenant max in flight, tenant max queued bytes,
--       then n pairs of (request id, body json)
-- The idempotency key is a hash {ids, open, grace}: it lives as long as its requests, then
-- `grace` seconds more than their results, so that a late replay is told they expired.
-- In flight = the stream's length (finish.lua deletes an answered request's entry); queued
-- bytes = the `bytes` of the tenant's usage hash (finish.lua and claim.lua count them down).
local session, open_set, stream = KEYS[1], KEYS[2], KEYS[3]
local base, tenant, session_id, replica = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, ttl, max_open = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local channel, n, idem_grace = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
local max_in_flight, max_bytes = tonumber(ARGV[11]), tonumber(ARGV[12])
local first = 13
local idempotency = KEYS[4]
local usage = base .. 'usage'

if idempotency then
  local earlier = redis.call('HGET', idempotency, 'ids')
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
if redis.call('XLEN', stream) + n > max_in_flight then
  return -3
end
local size = 0
for i = 0, n - 1 do
  size = size + string.len(ARGV[first + 1 + 2 * i])
end
if (tonumber(redis.call('HGET', usage, 'bytes')) or 0) + size > max_bytes then
  return -4
end
redis.call('HINCRBY', usage, 'bytes', size)
for i = 0, n - 1 do
  local id, body = ARGV[first + 2 * i], ARGV[first + 1 + 2 * i]
  local req = base .. 'req:' .. id
  local entry = redis.call('XADD', stream, '*', 'id', id, 'size', string.len(body))
  redis.call('HSET', req, 'status', 'pending', 'body', body, 'session', session_id,
    'enqueued_at', now, 'entry', entry, 'attempt', 0)
  if idempotency then
    -- finish.lua counts the key's requests down and then lets it expire with their results
    redis.call('HSET', req, 'idem', idempotency)
  end
  redis.call('EXPIRE', req, ttl)
  redis.call('SADD', req .. ':w', replica)
  redis.call('EXPIRE', req .. ':w', ttl)
  redis.call('SADD', open_set, id)
end
redis.call('EXPIRE', open_set, ttl)
if idempotency then
  local ids = {}
  for i = 0, n - 1 do
    ids[#ids + 1] = ARGV[first + 2 * i]
  end
  redis.call('HSET', idempotency, 'ids', cjson.encode(ids), 'open', n, 'grace', idem_grace)
  redis.call('EXPIRE', idempotency, ttl + idem_grace)
end
redis.call('PUBLISH', channel, tenant .. ' ' .. n .. ' ' .. replica)
return n
