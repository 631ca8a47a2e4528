-- fanout atomic publish (see crates/fanout-protocol/src/layout.rs and docs/protocol.md).
-- KEYS[1] = fanout:{C}:meta   KEYS[2] = fanout:{C}:history
-- ARGV[1] = C   ARGV[2] = body starting with '{'   ARGV[3] = history size
-- ARGV[4] = TTL seconds   ARGV[5] = epoch if none   ARGV[6] = '1' for SPUBLISH
-- ARGV[7] = TTL seconds instead of ARGV[4] (a finished job's history), or 0 / absent
-- Returns {offset, epoch}.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('DEL', KEYS[2])
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local envelope = '{"offset":' .. offset .. ',"epoch":"' .. epoch .. '",' .. string.sub(ARGV[2], 2)
local size = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
if tonumber(ARGV[7] or '0') > 0 then
  ttl = tonumber(ARGV[7])
end
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'e', envelope)
  redis.call('EXPIRE', KEYS[2], ttl)
end
redis.call('EXPIRE', KEYS[1], ttl)
if ARGV[6] == '1' then
  redis.call('SPUBLISH', ARGV[1], envelope)
else
  redis.call('PUBLISH', ARGV[1], envelope)
end
return {offset, epoch}
