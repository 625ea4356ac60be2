-- bucket.lua: one key's limiter call, atomic in one round trip. The Redis twin of
-- `check` in bucket.py: read that file's invariants first, and change both or neither
-- (tests/test_bucket.py runs one table of cases against the two).
--
-- KEYS[1]  request bucket  (hash: u = level in units, t = stamp in ms)
-- KEYS[2]  token bucket    (hash: u, t)
-- KEYS[3]  parallel slots  (sorted set: slot id scored by its expiry in ms)
-- KEYS[4]  budget of one period (hash: s = spent, r = held, e = epoch, t = created ms)
-- KEYS[5]  its reservations (sorted set: '<id>:<charge>' scored by expiry in ms)
-- All share one {hash tag} (the API key's id): one Redis Cluster slot. KEYS[4..5]
-- are passed, and read, only for keys with a budget.
--
-- ARGV: now ms ('' = the Redis server's clock, one clock for every replica), rpm, tpm,
--       parallel, cost, debt, take ('1' or '0'), slot, release, slot_ttl ms,
--       budget, hold, charge, base, epoch, period_ttl ms, hold_ttl ms,
--       then settlements, four values each: hold, spend, epoch, finished ms
-- Returns {allowed (1/0), kind, requests remaining, requests reset ms,
--          tokens remaining, tokens reset ms, retry ms,
--          budget left, budget held, epoch}

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
local budget = tonumber(ARGV[11])

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

local function charge_of(hold)
  return tonumber(string.match(hold, ':(%d+)$'))
end

-- The budget: created from base, expired holds dropped, settlements applied.
local bs, br, be, bt
if budget > 0 then
  local base = tonumber(ARGV[14])
  if redis.call('EXISTS', KEYS[4]) == 1 then
    local saved = redis.call('HMGET', KEYS[4], 's', 'r', 'e', 't')
    bs, br, be, bt = tonumber(saved[1]), tonumber(saved[2]), saved[3], tonumber(saved[4]) or 0
  elseif base >= 0 then
    redis.call('DEL', KEYS[5])  -- holds of a state that is gone went with it
    bs, br, be, bt = base, 0, ARGV[15], now
  end
  if bs then
    for _, hold in ipairs(redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)) do
      br = br - charge_of(hold)
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
    for i = 18, #ARGV, 4 do
      local hold = ARGV[i]
      local held = hold ~= '' and redis.call('ZREM', KEYS[5], hold) == 1
      if held then
        br = br - charge_of(hold)
      end
      if held or (ARGV[i + 2] ~= be and tonumber(ARGV[i + 3]) >= bt) then
        bs = bs + tonumber(ARGV[i + 1])
      end
    end
  end
end

local kind, retry = '', 0
if ARGV[7] == '1' then
  local need = math.min(cost, tpm) * UNIT
  local charge = tonumber(ARGV[13])
  if budget > 0 and not bs then
    kind = 'rebuild'
  elseif rpm > 0 and ru < UNIT then
    kind, retry = 'requests', math.ceil((UNIT - ru) / rpm)
  elseif tpm > 0 and tu < need then
    kind, retry = 'tokens', math.ceil((need - tu) / tpm)
  elseif budget > 0 and charge > budget - bs - br then
    kind = 'budget'
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
    if budget > 0 then
      redis.call('ZADD', KEYS[5], now + tonumber(ARGV[17]), ARGV[12] .. ':' .. ARGV[13])
      br = br + charge
    end
  end
end

if rpm > 0 then save(KEYS[1], ru, rs, rpm) end
if tpm > 0 then save(KEYS[2], tu, ts, tpm) end
if bs then
  redis.call('HSET', KEYS[4], 's', string.format('%.0f', bs), 'r', string.format('%.0f', br),
             'e', be, 't', string.format('%.0f', bt))
  local period_ttl = tonumber(ARGV[16])
  if period_ttl > 0 then
    redis.call('PEXPIRE', KEYS[4], period_ttl)
    redis.call('PEXPIRE', KEYS[5], period_ttl)
  end
end
return {
  kind == '' and 1 or 0,
  kind,
  rpm > 0 and remaining(ru) or 0,
  rpm > 0 and reset(ru, rpm) or 0,
  tpm > 0 and remaining(tu) or 0,
  tpm > 0 and reset(tu, tpm) or 0,
  retry,
  bs and (budget - bs - br) or 0,
  bs and br or 0,
  be or '',
}
