-- wrk script for scripts/benchmark: one MLflow REST call per request, keep-alive as the
-- MLflow client does, and every answer counted by status so no non-2xx can hide.
--
-- Arguments (after "--"): KIND [RUN_ID] [BODY]
--   metric   POST runs/log-metric, one new point per request
--   batch    POST runs/log-batch, 100 new points per request
--   search   POST runs/search in experiment RUN_ID's place: the experiment id
--   list     GET experiments/search
--   predict  POST BODY (a model's input as JSON) to the path given in RUN_ID's place
-- Headers (Authorization, Connection: close) come from wrk's -H options.
--
-- Metric points differ in step and value on every request: MLflow stores a repeated
-- (key, timestamp, step, value) through a slower duplicate-recovery path, which a real
-- client never takes.

local kind, target, body
local counter = 0
local base_ms = 0
statuses = {}  -- global: done() reads it from each thread with thread:get
local threads = {}

function setup(thread)
   thread:set("thread_id", #threads)
   table.insert(threads, thread)
end

function init(args)
   kind, target, body = args[1], args[2], args[3]
   base_ms = os.time() * 1000
   math.randomseed(os.time() + (thread_id or 0) * 7919)
   wrk.headers["Content-Type"] = "application/json"
   if kind == "list" then
      wrk.method = "GET"
      wrk.path = "/api/2.0/mlflow/experiments/search?max_results=100"
      wrk.headers["Content-Type"] = nil
   elseif kind == "predict" then
      wrk.method = "POST"
      wrk.path = target
      wrk.body = body
   elseif kind == "search" then
      wrk.method = "POST"
      wrk.path = "/api/2.0/mlflow/runs/search"
      wrk.body = '{"experiment_ids":["' .. target .. '"],"max_results":100}'
   else
      wrk.method = "POST"
   end
end

local function point(key)
   return string.format('{"key":"%s","value":%.17g,"timestamp":%d,"step":%d}',
      key, math.random(), base_ms + counter, counter)
end

function request()
   if kind == "metric" then
      counter = counter + 1
      local body = string.format(
         '{"run_id":"%s","key":"loss","value":%.17g,"timestamp":%d,"step":%d}',
         target, math.random(), base_ms + counter, counter)
      return wrk.format(nil, "/api/2.0/mlflow/runs/log-metric", nil, body)
   elseif kind == "batch" then
      counter = counter + 1
      local points = {}
      for i = 1, 100 do
         points[i] = point("m" .. i)
      end
      local body = '{"run_id":"' .. target .. '","metrics":[' .. table.concat(points, ",") .. "]}"
      return wrk.format(nil, "/api/2.0/mlflow/runs/log-batch", nil, body)
   end
   return wrk.format()
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
   local merged = {}
   for _, thread in ipairs(threads) do
      for status, count in pairs(thread:get("statuses")) do
         merged[status] = (merged[status] or 0) + count
      end
   end
   local parts = {}
   for status, count in pairs(merged) do
      table.insert(parts, string.format('"%d":%d', status, count))
   end
   io.write(string.format(
      'BENCH-RESULT {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,'
         .. '"write_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
         .. '"statuses":{%s}}\n',
      summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
      summary.errors.write, summary.errors.timeout, latency:percentile(50),
      latency:percentile(90), latency:percentile(99), table.concat(parts, ",")))
end
