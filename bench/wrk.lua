-- wrk script of the benchmark suite: POSTs BENCH_BODY (if set) and writes the summary and
-- the latency distribution (µs) as JSON to BENCH_OUT when the run ends.
local body = os.getenv("BENCH_BODY")
if body ~= nil and #body > 0 then
  wrk.method = "POST"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end
wrk.headers["Authorization"] = "Bearer sk-bench-0000000000000000"

function done(summary, latency, requests)
  local out = os.getenv("BENCH_OUT")
  if out == nil then return end
  local f = io.open(out, "w")
  local e = summary.errors
  f:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout))
  f:write(string.format('"latency_us":{"min":%d,"max":%d,"mean":%.3f,"stdev":%.3f,',
    latency.min, latency.max, latency.mean, latency.stdev))
  f:write(string.format('"p50":%d,"p90":%d,"p99":%d,"p999":%d,"cdf":[',
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
  local points = {0.001, 1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97.5, 99, 99.5, 99.9, 99.99, 100}
  for i, p in ipairs(points) do
    if i > 1 then f:write(",") end
    f:write(string.format("[%g,%d]", p, latency:percentile(p)))
  end
  f:write("]}}\n")
  f:close()
end
