-- wrk script for bench/suite.py. Each request carries a session token taken round-robin from
-- $BENCH_TOKENS (one per line; each thread walks its own slice), as `Authorization: Bearer`, or
-- as `X-Vault-Token` when $BENCH_AUTH=vault (OpenBao's own API, for the raw baseline); a fresh
-- Idempotency-Key when $BENCH_IDEMPOTENCY=1; $BENCH_BODY to $BENCH_PATH. With $BENCH_RATE
-- (requests/s for the whole run) each thread's requests keep a fixed schedule: its k-th request
-- is due at start + k * threads / rate and goes out on whichever of its connections is free
-- (wrk asks delay() once per request, per thread); one whose slot has passed goes at once and
-- is counted in "late". done() prints one JSON line for the suite to read.
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local threads = {}
local thread_count = 0

function setup(thread)
  thread:set("tid", thread_count)
  thread_count = thread_count + 1
  table.insert(threads, thread)
end

local tokens, mine, n, i, next_send, interval = {}, {}, 0, 0, nil, nil
local prefix = nil -- Idempotency-Key prefix per run and thread (wrk's random state is the same every run)
late = 0 -- global: done() reads it from each thread

function init(args)
  for line in io.lines(os.getenv("BENCH_TOKENS")) do
    if #line > 0 then tokens[#tokens + 1] = line end
  end
  -- each thread its own slice of the tokens, so two threads never walk the same sessions in step
  local per = math.max(1, math.floor(#tokens / tonumber(os.getenv("BENCH_THREADS") or "1")))
  for k = 1, per do
    mine[k] = tokens[((tid * per + k - 1) % #tokens) + 1]
  end
  n = #mine
  prefix = string.format("%d-%d", math.floor(now_ms() * 1000), tid)
  local rate = tonumber(os.getenv("BENCH_RATE") or "0")
  local threads = tonumber(os.getenv("BENCH_THREADS") or "1")
  if rate > 0 then interval = threads / rate * 1000 end
  wrk.method = "POST"
  wrk.body = os.getenv("BENCH_BODY")
end

local idempotency = os.getenv("BENCH_IDEMPOTENCY") == "1"
local vault_header = os.getenv("BENCH_AUTH") == "vault" -- OpenBao's own header, for the raw baseline

function request()
  i = i + 1
  local headers = { ["Content-Type"] = "application/json" }
  if vault_header then
    headers["X-Vault-Token"] = mine[(i % n) + 1]
  else
    headers["Authorization"] = "Bearer " .. mine[(i % n) + 1]
  end
  if idempotency then headers["Idempotency-Key"] = prefix .. "-" .. i end
  return wrk.format(nil, os.getenv("BENCH_PATH") or "/v1/capabilities", headers)
end

function delay()
  if interval == nil then return 0 end
  local t = now_ms()
  if next_send == nil then next_send = t + math.random() * interval end
  next_send = next_send + interval
  local wait = next_send - interval - t
  if wait < 0 then late = late + 1; return 0 end
  return wait
end

function done(summary, latency, requests)
  local lates = 0
  for _, t in ipairs(threads) do lates = lates + (t:get("late") or 0) end
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"non_2xx":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,' ..
    '"late":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout, lates,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
