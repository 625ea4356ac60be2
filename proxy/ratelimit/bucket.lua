-- bucket.lua: one key's limiter call, atomic in one round trip. The Redis twin of
-- `check` in bucket.py: read that file's invariants first, and change both or neither
-- (tests/test_bucket.py runs one table of cases against the two).
--
-- KEYS[1]  request bucket  (hash: u = level in units, t = stamp in ms)
-- KEYS[2]  token bucket    (hash: u, t)
-- KEYS[3]  parallel slots  (sorted set: slot id scored by its expiry in ms)
-- The three share one {hash tag} (the API key's id): one Redis Cluster slot.
--
-- ARGV: now ms ('' = the Redis server's clock, one clock for every replica), rpm, tpm,
--       parallel, cost, debt, take ('1' or '0'), slot, release, slot_ttl ms
-- Returns {allowed (1/0), kind, requests remaining, requests reset ms,
--          tokens remaining, tokens reset ms, retry ms}

local UNIT = 60000
local PARALLEL_RETRY_MS = 1000

local now = tonumber(ARGV[1])
if not now then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local rpm, tpm, parallel = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cost, debt = tonumber(ARGV[5]), tonumber(ARGV[6])
local slot, release, slot_ttl = ARGV[8], ARGV[9], tonumber(ARGV[10])

local function refill(key, rate)
  local saved = redis.call('HMGET', key, 'u', 't')
  local units, stamp = tonumber(saved[1]), tonumber(saved[2])
  if not units then
    return rate * UNIT, now
  end
  if now <= stamp then
    return units, stamp
  end
  return math.min(rate * UNIT, units + (now - stamp) * rate), now
end

local function remaining(units)
  return math.floor(math.max(units, 0) / UNIT)
end

local function reset(units, rate)
  return math.ceil((rate * UNIT - units) / rate)
end

local function save(key, units, stamp, rate)
  redis.call('HSET', key, 'u', string.format('%.0f', units), 't', string.format('%.0f', stamp))
  -- A bucket that is full again means the same as a missing one: let idle ones vanish.
  redis.call('PEXPIRE', key, reset(units, rate) + 60000)
end

local ru, rs, tu, ts
if rpm > 0 then
  ru, rs = refill(KEYS[1], rpm)
end
if tpm > 0 then
  tu, ts = refill(KEYS[2], tpm)
  tu = math.min(tpm * UNIT, tu - debt * UNIT)
end
if release ~= '' then
  redis.call('ZREM', KEYS[3], release)
end

local kind, retry = '', 0
if ARGV[7] == '1' then
  local need = math.min(cost, tpm) * UNIT
  if rpm > 0 and ru < UNIT then
    kind, retry = 'requests', math.ceil((UNIT - ru) / rpm)
  elseif tpm > 0 and tu < need then
    kind, retry = 'tokens', math.ceil((need - tu) / tpm)
  elseif parallel > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
    if redis.call('ZCARD', KEYS[3]) >= parallel then
      kind, retry = 'parallel', PARALLEL_RETRY_MS
    else
      redis.call('ZADD', KEYS[3], now + slot_ttl, slot)
      redis.call('PEXPIRE', KEYS[3], slot_ttl)
    end
  end
  if kind == '' then
    if rpm > 0 then ru = ru - UNIT end
    if tpm > 0 then tu = tu - cost * UNIT end
  end
end

if rpm > 0 then save(KEYS[1], ru, rs, rpm) end
if tpm > 0 then save(KEYS[2], tu, ts, tpm) end
return {
  kind == '' and 1 or 0,
  kind,
  rpm > 0 and remaining(ru) or 0,
  rpm > 0 and reset(ru, rpm) or 0,
  tpm > 0 and remaining(tu) or 0,
  tpm > 0 and reset(tu, tpm) or 0,
  retry,
}
