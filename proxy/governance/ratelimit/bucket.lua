-- bucket.lua: one limiter call, atomic in one round trip, for one or more scopes (an
-- API key, and the key's team: admitted only when every scope allows it). The Redis
-- twin of `check_all` in bucket.py: read that file's invariants first, and change
-- both or neither (tests/governance/test_bucket.py runs one table of cases against the two).
--
-- Per scope, five KEYS (the scope's budget ones are read only when it has a budget):
--   request bucket (hash: u = level in units, t = stamp in ms)
--   token bucket   (hash: u, t)
--   parallel slots (sorted set: slot id scored by its expiry in ms)
--   budget of one period (hash: s = spent, r = held, e = epoch, t = created ms)
--   its reservations (sorted set: '<id>:<charge>' scored by expiry in ms)
-- All share one {hash tag} (the key's id, or its team's): one Redis Cluster slot.
--
-- ARGV: now ms ('' = the Redis server's clock, one clock for every replica), the
--       number of scopes, then per scope: rpm, tpm, parallel, cost, debt, take ('1'
--       or '0'), slot, release, slot_ttl ms, budget, hold, charge, base, epoch,
--       period_ttl ms, hold_ttl ms, requests (how many a take takes), returned
--       (requests given back), the number of settlements, then the settlements,
--       four values each: hold, spend, epoch, finished ms
-- Returns {allowed (1/0), kind, retry ms, the index (0-based) of the scope that
--          refused (0 when admitted), then per scope: requests remaining, requests
--          reset ms, tokens remaining, tokens reset ms, budget left, budget held,
--          epoch}

local UNIT = 60000
local PARALLEL_RETRY_MS = 1000

local now = tonumber(ARGV[1])
if not now then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

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

local function charge_of(hold)
  return tonumber(string.match(hold, ':(%d+)$'))
end

-- Parse the scopes; refill, apply debts, releases and settlements (phase 1).
local scopes = {}
local at = 3
for n = 1, tonumber(ARGV[2]) do
  local k = (n - 1) * 5
  local s = {
    keys = {KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]},
    rpm = tonumber(ARGV[at]), tpm = tonumber(ARGV[at + 1]), parallel = tonumber(ARGV[at + 2]),
    cost = tonumber(ARGV[at + 3]), debt = tonumber(ARGV[at + 4]), take = ARGV[at + 5] == '1',
    slot = ARGV[at + 6], release = ARGV[at + 7], slot_ttl = tonumber(ARGV[at + 8]),
    budget = tonumber(ARGV[at + 9]), hold = ARGV[at + 10], charge = tonumber(ARGV[at + 11]),
    base = tonumber(ARGV[at + 12]), epoch = ARGV[at + 13], period_ttl = tonumber(ARGV[at + 14]),
    hold_ttl = tonumber(ARGV[at + 15]), requests = tonumber(ARGV[at + 16]),
    returned = tonumber(ARGV[at + 17]),
  }
  local settled = tonumber(ARGV[at + 18])
  local first = at + 19
  at = first + settled * 4
  if s.rpm > 0 then
    s.ru, s.rs = refill(s.keys[1], s.rpm)
    s.ru = math.min(s.rpm * UNIT, s.ru + s.returned * UNIT)
  end
  if s.tpm > 0 then
    s.tu, s.ts = refill(s.keys[2], s.tpm)
    s.tu = math.min(s.tpm * UNIT, s.tu - s.debt * UNIT)
  end
  if s.release ~= '' then
    redis.call('ZREM', s.keys[3], s.release)
  end
  -- The budget: created from base, expired holds dropped, settlements applied.
  if s.budget > 0 then
    if redis.call('EXISTS', s.keys[4]) == 1 then
      local saved = redis.call('HMGET', s.keys[4], 's', 'r', 'e', 't')
      s.bs, s.br, s.be, s.bt = tonumber(saved[1]), tonumber(saved[2]), saved[3], tonumber(saved[4]) or 0
    elseif s.base >= 0 then
      redis.call('DEL', s.keys[5])  -- holds of a state that is gone went with it
      s.bs, s.br, s.be, s.bt = s.base, 0, s.epoch, now
    end
    if s.bs then
      for _, hold in ipairs(redis.call('ZRANGEBYSCORE', s.keys[5], '-inf', now)) do
        s.br = s.br - charge_of(hold)
      end
      redis.call('ZREMRANGEBYSCORE', s.keys[5], '-inf', now)
      for i = first, at - 1, 4 do
        local hold = ARGV[i]
        local held = hold ~= '' and redis.call('ZREM', s.keys[5], hold) == 1
        if held then
          s.br = s.br - charge_of(hold)
        end
        if held or (ARGV[i + 2] ~= s.be and tonumber(ARGV[i + 3]) >= s.bt) then
          s.bs = s.bs + tonumber(ARGV[i + 1])
        end
      end
    end
  end
  scopes[n] = s
end

-- Phase 2: every scope that takes must allow it, in order; the first refusal wins.
local kind, retry, refused_by = '', 0, 0
for n, s in ipairs(scopes) do
  if kind == '' and s.take then
    local need = math.min(s.cost, s.tpm) * UNIT
    local asked = math.min(s.requests, s.rpm) * UNIT
    if s.budget > 0 and not s.bs then
      kind = 'rebuild'
    elseif s.rpm > 0 and s.ru < asked then
      kind, retry = 'requests', math.ceil((asked - s.ru) / s.rpm)
    elseif s.tpm > 0 and s.tu < need then
      kind, retry = 'tokens', math.ceil((need - s.tu) / s.tpm)
    elseif s.budget > 0 and s.charge > s.budget - s.bs - s.br then
      kind = 'budget'
    elseif s.parallel > 0 then
      redis.call('ZREMRANGEBYSCORE', s.keys[3], '-inf', now)
      if redis.call('ZCARD', s.keys[3]) >= s.parallel then
        kind, retry = 'parallel', PARALLEL_RETRY_MS
      end
    end
    if kind ~= '' then
      refused_by = n - 1
    end
  end
end

-- Phase 3: take from every scope, or from none; save.
local reply = {kind == '' and 1 or 0, kind, retry, refused_by}
for _, s in ipairs(scopes) do
  if kind == '' and s.take then
    if s.parallel > 0 then
      redis.call('ZADD', s.keys[3], now + s.slot_ttl, s.slot)
      redis.call('PEXPIRE', s.keys[3], s.slot_ttl)
    end
    if s.rpm > 0 then s.ru = s.ru - s.requests * UNIT end
    if s.tpm > 0 then s.tu = s.tu - s.cost * UNIT end
    if s.budget > 0 then
      redis.call('ZADD', s.keys[5], now + s.hold_ttl, s.hold .. ':' .. s.charge)
      s.br = s.br + s.charge
    end
  end
  if s.rpm > 0 then save(s.keys[1], s.ru, s.rs, s.rpm) end
  if s.tpm > 0 then save(s.keys[2], s.tu, s.ts, s.tpm) end
  if s.bs then
    redis.call('HSET', s.keys[4], 's', string.format('%.0f', s.bs), 'r', string.format('%.0f', s.br),
               'e', s.be, 't', string.format('%.0f', s.bt))
    if s.period_ttl > 0 then
      redis.call('PEXPIRE', s.keys[4], s.period_ttl)
      redis.call('PEXPIRE', s.keys[5], s.period_ttl)
    end
  end
  local rest = {
    s.rpm > 0 and remaining(s.ru) or 0,
    s.rpm > 0 and reset(s.ru, s.rpm) or 0,
    s.tpm > 0 and remaining(s.tu) or 0,
    s.tpm > 0 and reset(s.tu, s.tpm) or 0,
    s.bs and (s.budget - s.bs - s.br) or 0,
    s.bs and s.br or 0,
    s.be or '',
  }
  for _, value in ipairs(rest) do
    reply[#reply + 1] = value
  end
end
return reply
