-- wrk script for GET cells: no request changes, one machine-readable line at the end.
-- RESULT <requests> <duration_us> <p50_us> <p99_us> <errors>
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
