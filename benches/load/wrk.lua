-- wrk script shared by every HTTP scenario of benches/load/bench.py.
--  * connects to 127.0.0.1 whatever the URL's host is (so the URL host can be a real name);
--  * with ICP_HOSTS_FILE set, rotates the Host header over the names in that file (one per
--    line), every request pre-formatted once in init() so the per-request Lua cost is one
--    table index;
--  * prints one machine-readable line (WRKJSON {...}) at the end for bench.py.

function wrk.resolve(host, service)
   wrk.addrs = wrk.lookup("127.0.0.1", service)
end

local requests = nil
local count, i = 0, 0

function init(args)
   local path = os.getenv("ICP_HOSTS_FILE")
   if path == nil or path == "" then return end
   requests = {}
   for line in io.lines(path) do
      if #line > 0 then
         count = count + 1
         requests[count] = wrk.format(nil, nil, { Host = line })
      end
   end
   -- threads start at different offsets so they do not walk the list in step
   i = (math.floor(os.clock() * 1000003) % count)
end

if os.getenv("ICP_HOSTS_FILE") and os.getenv("ICP_HOSTS_FILE") ~= "" then
   function request()
      i = i % count + 1
      return requests[i]
   end
end

function done(summary, latency, _)
   local e = summary.errors
   io.write(string.format(
      'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect_err":%d,"read_err":%d,' ..
      '"write_err":%d,"status_err":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
      e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
