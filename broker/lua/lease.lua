-- Shared by claim.lua and enqueue.lua (prepended after finish.lua): lease up to `count`
-- requests of one tenant: first those whose lease expired or was handed back (re-delivery,
-- scanned at most every reap interval), then new ones. A request delivered more than
-- max_attempts times fails as undeliverable instead; one of a session that expired (or was
-- closed) is never delivered: it fails with the session_expired result instead, so no
-- poller pays for an answer nobody can read.
-- `opts`: stream, reap_lock, reap_cursor, base, group, consumer, count, lease_ms, now,
-- max_attempts, reap_ms, replies, result_ttl, undeliverable and session_gone (result JSON
-- with "__ID__" for the id), and polls: the long-polls leased for, in order, each
-- {tag = '<scope>:<poll id>' or '' (none), cap = how many it takes}; their caps add up to
-- `count`. The requests leased fill the first poll up to its cap, then the next.
-- A poll with a tag has it recorded with each of its leases (the request hash's `poll`) and
-- in its poll set (`<base>poll:<tag>`, living one lease), so that a poller that never got
-- the answer can have them handed back (release.lua). A lease without a tag clears a
-- `poll` left from an earlier one.
-- Returns a flat list of 6-tuples (id, attempt, body, session id, enqueued_at, session
-- metadata) and how many never-delivered entries were read (the rest were re-deliveries).
local function lease(opts)
  local stream, base, group, now = opts.stream, opts.base, opts.group, opts.now
  local out = {}
  local sessions = {}
  local polls = opts.polls
  local slot, filled = 1, 0
  local tagged = {}  -- per poll (by its slot): the request ids leased to it
  -- Record the next lease given out, its attempt and the poll it goes to, in one write.
  local function record(req, id, attempt, was_tagged)
    while polls[slot] and filled >= polls[slot].cap do
      slot, filled = slot + 1, 0
    end
    filled = filled + 1
    local poll = polls[slot]
    if poll and poll.tag ~= '' then
      redis.call('HSET', req, 'attempt', attempt, 'poll', poll.tag)
      tagged[slot] = tagged[slot] or {}
      table.insert(tagged[slot], id)
    else
      redis.call('HSET', req, 'attempt', attempt)
      if was_tagged then
        redis.call('HDEL', req, 'poll')
      end
    end
  end
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
      local data = req and redis.call('HMGET', req, 'status', 'body', 'session', 'enqueued_at',
        'poll', 'attempt')
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
        -- this delivery counted (written below, with the lease's poll: one HSET, not two)
        local attempt = (tonumber(data[6]) or 0) + 1
        if not meta then
          redis.call('HSET', req, 'attempt', attempt)
          local result = string.gsub(opts.session_gone, '__ID__', id)
          finish(base, stream, group, opts.replies, id, 'error', result, opts.result_ttl, now)
        elseif attempt > opts.max_attempts then
          redis.call('HSET', req, 'attempt', attempt)
          local result = string.gsub(opts.undeliverable, '__ID__', id)
          finish(base, stream, group, opts.replies, id, 'error', result, opts.result_ttl, now)
        else
          record(req, id, attempt, data[5])
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

  if redis.call('SET', opts.reap_lock, '1', 'NX', 'PX', opts.reap_ms) then
    local cursor = redis.call('GET', opts.reap_cursor) or '0-0'
    local claimed = redis.call('XAUTOCLAIM', stream, group, opts.consumer, opts.lease_ms,
      cursor, 'COUNT', opts.count)
    redis.call('SET', opts.reap_cursor, claimed[1])
    take(claimed[2])
  end
  local fresh = 0
  local wanted = opts.count - #out / 6
  if wanted > 0 then
    local read = redis.call('XREADGROUP', 'GROUP', group, opts.consumer, 'COUNT', wanted,
      'STREAMS', stream, '>')
    if read then
      fresh = #read[1][2]
      take(read[1][2])
    end
  end
  for i, poll in ipairs(polls) do
    local ids = tagged[i]
    if ids then
      local key = base .. 'poll:' .. poll.tag
      for first = 1, #ids, 1000 do  -- unpack's bound on results
        redis.call('SADD', key, unpack(ids, first, math.min(first + 999, #ids)))
      end
      redis.call('PEXPIRE', key, opts.lease_ms)
    end
  end
  return out, fresh
end
