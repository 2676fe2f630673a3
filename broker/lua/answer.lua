-- Record answers (first answer wins) for requests of one tenant.
-- KEYS: tenant stream
-- ARGV: tenant base, group, replies prefix, result ttl, now, n, answering replica, then n
--       triples of (request id, 'done' | 'error', result json)
-- The answering replica resolves its own waiters of accepted answers: nothing is published
-- to it.
-- Returns per answer: 'accepted:<enqueued_at>', 'duplicate' or 'not_found'.
local stream = KEYS[1]
local base, group, replies, result_ttl, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local n, replica = tonumber(ARGV[6]), ARGV[7]
local out = {}
for i = 0, n - 1 do
  local id, status, result = ARGV[8 + 3 * i], ARGV[9 + 3 * i], ARGV[10 + 3 * i]
  local outcome = finish(base, stream, group, replies, id, status, result, result_ttl, now,
    replica)
  if not outcome then
    out[#out + 1] = 'not_found'
  elseif outcome == 'duplicate' then
    out[#out + 1] = 'duplicate'
  else
    out[#out + 1] = 'accepted:' .. outcome
  end
end
return out
