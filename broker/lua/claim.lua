-- Lease up to COUNT requests of one tenant (lease.lua: expired or handed-back leases first,
-- then new ones).
-- KEYS: tenant stream, reap lock, reap cursor
-- ARGV: tenant base, group, consumer, count, lease ms, now, max attempts, reap interval ms,
--       replies prefix, result ttl, undeliverable result json (with "__ID__" for the id),
--       session expired result json (same), the long-poll's tag ('<scope>:<poll id>', or ''
--       when it named no poll id)
-- Returns a flat list of 6-tuples: id, attempt, body, session id, enqueued_at, session metadata.
local count = tonumber(ARGV[4])
local leased = lease({
  stream = KEYS[1], reap_lock = KEYS[2], reap_cursor = KEYS[3],
  base = ARGV[1], group = ARGV[2], consumer = ARGV[3], count = count,
  lease_ms = ARGV[5], now = ARGV[6], max_attempts = tonumber(ARGV[7]), reap_ms = ARGV[8],
  replies = ARGV[9], result_ttl = ARGV[10], undeliverable = ARGV[11],
  session_gone = ARGV[12], polls = {{tag = ARGV[13] or '', cap = count}},
})
return leased
