-- Close a session: mark it revoked and fail each of its unanswered requests.
-- KEYS: tenant stream, session hash, session open set
-- ARGV: tenant base, group, replies prefix, result ttl, now, closed result json ("__ID__"),
--       session id (taken off the tenant's open sessions)
-- Returns the number of requests failed, or -1 when the session does not exist.
local stream, session, open_set = KEYS[1], KEYS[2], KEYS[3]
local base, group, replies, result_ttl, now, closed = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('EXISTS', session) == 0 then
  return -1
end
redis.call('HSET', session, 'status', 'revoked')
redis.call('ZREM', base .. 'sessions', ARGV[7])
local failed = 0
for _, id in ipairs(redis.call('SMEMBERS', open_set)) do
  local result = string.gsub(closed, '__ID__', id)
  if finish(base, stream, group, replies, id, 'error', result, result_ttl, now) then
    failed = failed + 1
  end
end
redis.call('DEL', open_set)
return failed
