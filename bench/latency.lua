-- bench/latency.lua: makes wrk print "p50 p99 p999 requests errors" (latencies in
-- microseconds) as its last line, for bench/run.
done = function(summary, latency, requests)
  local e = summary.errors
  local errors = e.connect + e.read + e.write + e.status + e.timeout
  io.write(string.format("RESULT %d %d %d %d %d\n", latency:percentile(50),
    latency:percentile(99), latency:percentile(99.9), summary.requests, errors))
end
