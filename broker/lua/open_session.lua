-- Count a new session against its tenant's quota of open sessions, atomically.
-- KEYS: the tenant's sessions zset (session id -> expires_at)
-- ARGV: now, max sessions, session id, expires_at
-- Returns 0 when counted, else the seconds until the tenant's next session expires (> 0).
local sessions = KEYS[1]
local now, max_sessions = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', sessions, '-inf', now)
if redis.call('ZCARD', sessions) >= max_sessions then
  local first = redis.call('ZRANGE', sessions, 0, 0, 'WITHSCORES')
  return math.max(1, math.ceil(tonumber(first[2]) - now))
end
redis.call('ZADD', sessions, ARGV[4], ARGV[3])
return 0
