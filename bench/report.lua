-- wrk script for bench/run.py: counts responses per HTTP status over all threads and prints one
-- line of JSON at the end (after wrk's own report), so the harness need not parse wrk's text.
-- Argument (after --): N, send "Connection: close" on every Nth request of a thread, so that its
-- connections reconnect now and then (0: never, 1: every request).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  reconnect_every = tonumber(args[1] or "0") or 0
  sent = 0
  keep = wrk.format()
  close = wrk.format(nil, nil, {["Connection"] = "close"})
end

function request()
  sent = sent + 1
  if reconnect_every > 0 and sent % reconnect_every == 0 then
    return close
  end
  return keep
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for code, n in pairs(thread:get("statuses")) do
      total[code] = (total[code] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(total) do
    table.insert(parts, string.format('"%d": %d', code, n))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}, "statuses": {%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
    table.concat(parts, ", ")))
end
