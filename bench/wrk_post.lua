-- wrk script for bench/serving.py: POST the body in $WRK_BODY; at the end print one line "WRK {json}" with the
-- requests, the non-2xx/3xx answers, socket errors and 100 latency quantiles (0.5 % ... 99.5 %, microseconds).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(os.getenv("WRK_BODY"), "rb")); wrk.body = f:read("*a"); f:close()
function done(summary, latency, requests)
  local e = summary.errors
  local q = {}
  for p = 0.5, 99.5, 1 do q[#q + 1] = string.format("%d", latency:percentile(p)) end
  io.write(string.format('WRK {"requests":%d,"duration_us":%d,"status_errors":%d,"socket_errors":%d,"quantiles_us":[%s]}\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout, table.concat(q, ",")))
end
