-- Accept the /enqueue calls of one tenant made in one event-loop tick, each atomically and
-- in order: per request a stream entry + request hash (which names this replica as its
-- `origin`, the first replica finish.lua notifies); then one announcement of the tenant's
-- new work. Per call the result is the count accepted, -1 when its session is
-- closed or expired, -2 when the session would exceed its open-request limit, -3 / -4 when
-- the tenant would exceed its quota of requests in flight / of queued bytes, or, when its
-- idempotency key was seen before, the JSON list of the request ids it accepted then.
-- KEYS: tenant stream, then per call: session hash, session open set[, idempotency key];
--       with a hand-off, then: reap lock, reap cursor
-- ARGV: tenant base, tenant id, replica id, now, request ttl, max open, work channel,
--       idempotency grace s, tenant max in flight, tenant max queued bytes, number of calls,
--       1 | 0 (this replica's own subscription to the work channel is up), then per call: session id, 1 | 0 (has an idempotency key), n, then n pairs of
--       (request id, body json); then, only for a hand-off: count, group, consumer,
--       lease ms, max attempts, reap interval ms, replies prefix, result ttl, undeliverable
--       result json, session expired result json (as claim.lua takes them), the number of
--       long-polls, then per long-poll: its tag ('<scope>:<poll id>' or ''), how many it takes
-- The hand-off: long-polls parked on this replica, reserved by the caller, take up to
-- `count` requests leased here (lease.lua, as claim.lua would lease them, each recorded with
-- the poll it goes to, in order) instead of a claim script of their own; the script then
-- also returns, after the per-call results,
-- how many never-delivered entries it leased and the flat 6-tuples leased. Only the
-- accepted requests that were not leased are announced.
-- The idempotency key is a hash {ids, open, grace}: it lives as long as its requests, then
-- `grace` seconds more than their results, so that a late replay is told they expired.
-- In flight = the stream's length (finish.lua deletes an answered request's entry); queued
-- bytes = the `bytes` of the tenant's usage hash (finish.lua and claim.lua count them down).
local stream = KEYS[1]
local base, tenant, replica, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, max_open, channel = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local idem_grace, max_in_flight, max_bytes = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local calls = tonumber(ARGV[11])
local own_subscription = tonumber(ARGV[12])
local usage = base .. 'usage'

-- Read once per script and counted up here as calls are accepted (the calls of one tick
-- often share a session): the stream's length, and per session whether it may enqueue and
-- how many of its requests are open; its open set's lifetime is renewed once, at the end.
local in_flight = nil
local sessions = {}
local renew = {}

-- One call: its keys and its arguments from `first` (the first request id) on.
local function enqueue(session, open_set, idempotency, session_id, n, first)
  if idempotency then
    local earlier = redis.call('HGET', idempotency, 'ids')
    if earlier then
      return earlier
    end
  end
  local known = sessions[session]
  if known == nil then
    local status = redis.call('HMGET', session, 'status', 'expires_at')
    known = {active = status[1] == 'active' and tonumber(status[2]) > tonumber(now)}
    sessions[session] = known
  end
  if not known.active then
    return -1
  end
  known.open = known.open or redis.call('SCARD', open_set)
  if known.open + n > max_open then
    return -2
  end
  in_flight = in_flight or redis.call('XLEN', stream)
  if in_flight + n > max_in_flight then
    return -3
  end
  local size = 0
  for i = 0, n - 1 do
    size = size + string.len(ARGV[first + 1 + 2 * i])
  end
  -- Counted up first (the new total in one command) and given back when over the quota.
  if redis.call('HINCRBY', usage, 'bytes', size) > max_bytes then
    redis.call('HINCRBY', usage, 'bytes', -size)
    return -4
  end
  for i = 0, n - 1 do
    local id, body = ARGV[first + 2 * i], ARGV[first + 1 + 2 * i]
    local req = base .. 'req:' .. id
    local entry = redis.call('XADD', stream, '*', 'id', id, 'size', string.len(body))
    -- `size` spares finish.lua an HSTRLEN; `origin` a watchers set for the enqueuing replica
    if idempotency then
      -- finish.lua counts the key's requests down and then lets it expire with their results
      redis.call('HSET', req, 'status', 'pending', 'body', body, 'session', session_id,
        'enqueued_at', now, 'entry', entry, 'attempt', 0, 'size', string.len(body),
        'origin', replica, 'idem', idempotency)
    else
      redis.call('HSET', req, 'status', 'pending', 'body', body, 'session', session_id,
        'enqueued_at', now, 'entry', entry, 'attempt', 0, 'size', string.len(body),
        'origin', replica)
    end
    redis.call('EXPIRE', req, ttl)
    redis.call('SADD', open_set, id)
  end
  if not known.renew then
    known.renew = true
    renew[#renew + 1] = open_set
  end
  known.open = known.open + n
  in_flight = in_flight + n
  if idempotency then
    local ids = {}
    for i = 0, n - 1 do
      ids[#ids + 1] = ARGV[first + 2 * i]
    end
    redis.call('HSET', idempotency, 'ids', cjson.encode(ids), 'open', n, 'grace', idem_grace)
    redis.call('EXPIRE', idempotency, ttl + idem_grace)
  end
  return n
end

local out = {}
local accepted = 0
local key, arg = 2, 13
for _ = 1, calls do
  local session_id, has_idem, n = ARGV[arg], ARGV[arg + 1] == '1', tonumber(ARGV[arg + 2])
  local idempotency = has_idem and KEYS[key + 2] or nil
  local result = enqueue(KEYS[key], KEYS[key + 1], idempotency, session_id, n, arg + 3)
  if type(result) == 'number' and result > 0 then
    accepted = accepted + result
  end
  out[#out + 1] = result
  key = key + (has_idem and 3 or 2)
  arg = arg + 3 + 2 * n
end
for _, open_set in ipairs(renew) do
  redis.call('EXPIRE', open_set, ttl)
end
local leased, fresh = nil, 0
if arg <= #ARGV and accepted > 0 then
  local polls = {}
  for i = 1, tonumber(ARGV[arg + 10]) do
    polls[i] = {tag = ARGV[arg + 9 + 2 * i], cap = tonumber(ARGV[arg + 10 + 2 * i])}
  end
  leased, fresh = lease({
    stream = stream, reap_lock = KEYS[key], reap_cursor = KEYS[key + 1],
    base = base, count = tonumber(ARGV[arg]), group = ARGV[arg + 1],
    consumer = ARGV[arg + 2], lease_ms = ARGV[arg + 3], now = now,
    max_attempts = tonumber(ARGV[arg + 4]), reap_ms = ARGV[arg + 5], replies = ARGV[arg + 6],
    result_ttl = ARGV[arg + 7], undeliverable = ARGV[arg + 8], session_gone = ARGV[arg + 9],
    polls = polls,
  })
end
-- Announced only if a replica other than this one listens (NUMSUB counts this one's own
-- subscription while it is up): the replica wakes its own long-polls itself, and the
-- message would only come back to it to be dropped. A replica that subscribes after this
-- finds the work by its long-polls' periodic claim (RLM_WORK_RECHECK_S) and claims on start.
local announce = accepted - fresh
if announce > 0 and redis.call('PUBSUB', 'NUMSUB', channel)[2] > own_subscription then
  redis.call('PUBLISH', channel, tenant .. ' ' .. announce .. ' ' .. replica)
end
if arg <= #ARGV then
  out[#out + 1] = fresh
  out[#out + 1] = leased or {}
end
return out
