-- Lease up to COUNT requests of one tenant: first those whose lease expired (re-delivery,
-- scanned at most every reap interval), then new ones. A request delivered more than
-- max_attempts times fails as undeliverable instead.
-- KEYS: tenant stream, reap lock, reap cursor
-- A request of a session that expired (or was closed) is never delivered: it fails with
-- the session_expired result instead, so no poller pays for an answer nobody can read.
-- ARGV: tenant base, group, consumer, count, lease ms, now, max attempts, reap interval ms,
--       replies prefix, result ttl, undeliverable result json (with "__ID__" for the id),
--       session expired result json (same)
-- Returns a flat list of 6-tuples: id, attempt, body, session id, enqueued_at, session metadata.
local stream, reap_lock, reap_cursor = KEYS[1], KEYS[2], KEYS[3]
local base, group, consumer = ARGV[1], ARGV[2], ARGV[3]
local count, lease_ms, now = tonumber(ARGV[4]), ARGV[5], ARGV[6]
local max_attempts, reap_ms = tonumber(ARGV[7]), ARGV[8]
local replies, result_ttl, undeliverable = ARGV[9], ARGV[10], ARGV[11]
local session_gone = ARGV[12]

local out = {}
local sessions = {}
-- The session's metadata, or false when it may no longer be served (closed or expired).
local function session_metadata(session_id)
  local found = sessions[session_id]
  if found == nil then
    local fields = redis.call('HMGET', base .. 'session:' .. session_id, 'status',
      'expires_at', 'metadata')
    if fields[1] ~= 'active' or tonumber(fields[2]) <= tonumber(now) then
      found = false
    else
      found = fields[3] or '{}'
    end
    sessions[session_id] = found
  end
  return found
end
local function take(entries)
  for _, entry in ipairs(entries) do
    -- entry = {stream id, {'id', request id, 'size', body bytes}}; a deleted entry has no
    -- fields
    local fields = entry[2]
    local id = fields and fields[2]
    local req = id and (base .. 'req:' .. id)
    local data = req and redis.call('HMGET', req, 'status', 'body', 'session', 'enqueued_at')
    local status = data and data[1]
    if status ~= 'pending' then
      if id and not status then
        -- the request expired unanswered: its body is gone, and its bytes with it
        release_bytes(base, tonumber(fields[4]) or 0)
      end
      redis.call('XACK', stream, group, entry[1])
      redis.call('XDEL', stream, entry[1])
    else
      local meta = session_metadata(data[3])
      local attempt = redis.call('HINCRBY', req, 'attempt', 1)
      if not meta then
        local result = string.gsub(session_gone, '__ID__', id)
        finish(base, stream, group, replies, id, 'error', result, result_ttl, now)
      elseif attempt > max_attempts then
        local result = string.gsub(undeliverable, '__ID__', id)
        finish(base, stream, group, replies, id, 'error', result, result_ttl, now)
      else
        out[#out + 1] = id
        out[#out + 1] = attempt
        out[#out + 1] = data[2]
        out[#out + 1] = data[3]
        out[#out + 1] = data[4]
        out[#out + 1] = meta
      end
    end
  end
end

if redis.call('SET', reap_lock, '1', 'NX', 'PX', reap_ms) then
  local cursor = redis.call('GET', reap_cursor) or '0-0'
  local claimed = redis.call('XAUTOCLAIM', stream, group, consumer, lease_ms, cursor,
    'COUNT', count)
  redis.call('SET', reap_cursor, claimed[1])
  take(claimed[2])
end
local wanted = count - #out / 6
if wanted > 0 then
  local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', wanted,
    'STREAMS', stream, '>')
  if read then
    take(read[1][2])
  end
end
return out
