-- wrk's side of scripts/bench_peers.py --client wrk: sends each request body of a file (one JSON
-- body per line) exactly once, in order, over wrk's connections (run it with -t 1), then parks.
--
--   wrk -t 1 -c 64 -d 3600s --timeout 600s -s scripts/bench_peers.lua URL -- BODIES_FILE
--
-- wrk has no request count, only a duration, so the script tells the driver on stderr (unbuffered,
-- read line by line there) when the last answer came: "done <answered> <refused> <failed>". The
-- driver times the pass itself and stops wrk with SIGINT; wrk then prints its latency summary,
-- which counts only these bodies' requests: a connection with nothing left to send waits on a
-- ten-minute delay instead of sending anything else.

function init(args)
    bodies = {}
    for line in io.lines(args[1]) do
        bodies[#bodies + 1] = line
    end
    claimed, sent, answered, refused, failed = 0, 0, 0, 0, 0
    headers = {["Content-Type"] = "application/json"}
end

-- wrk asks delay() before every request (a first one included) and request() some time later,
-- when the delay's timer fires: a body is claimed in delay(), so a connection that was told to
-- go on always has one left when it asks for it
function delay()
    if claimed >= #bodies then
        return 600000
    end
    claimed = claimed + 1
    return 0
end

function request()
    if not verified then
        -- wrk calls request() once before any connection, to check that it parses (and sends
        -- nothing from that call): give it the first body without counting it as sent
        verified = true
        return wrk.format("POST", nil, headers, bodies[1])
    end
    sent = sent + 1
    return wrk.format("POST", nil, headers, bodies[sent])
end

function response(status, _, body)
    if status == 200 and string.find(body, '"embedding"', 1, true) then
        answered = answered + 1
    elseif status == 429 or status == 503 then
        -- refused for load: wrk cannot tell which body it was, so the pass is void (the Python
        -- client retries after Retry-After instead)
        refused = refused + 1
    else
        failed = failed + 1
        if failed == 1 then
            io.stderr:write("first failure " .. status .. ": " .. string.sub(body, 1, 200) .. "\n")
        end
    end
    if answered + refused + failed == #bodies then
        io.stderr:write(string.format("done %d %d %d\n", answered, refused, failed))
        io.stderr:flush()
    end
end

function done(summary, latency, _)
    io.write(string.format("latency_p50_us %d\nrequests %d\n", latency:percentile(50),
                           summary.requests))
end
