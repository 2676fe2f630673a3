-- Read a request for a waiting caller; while it is unanswered, add this replica to its
-- watchers first (finish.lua notifies them, and reads the set only of a request marked
-- `watched`), with the request's own remaining lifetime.
-- An answered or unknown request adds no watcher: nothing would ever remove it.
-- KEYS: request hash, watchers set
-- ARGV: replica id
-- Returns {status, session, result} (nils for an unknown request).
local req, watchers = KEYS[1], KEYS[2]
local fields = redis.call('HMGET', req, 'status', 'session', 'result')
if fields[1] == 'pending' then
  redis.call('SADD', watchers, ARGV[1])
  redis.call('HSET', req, 'watched', '1')
  local ttl = redis.call('PTTL', req)
  if ttl > 0 then
    redis.call('PEXPIRE', watchers, ttl)
  end
end
return fields
