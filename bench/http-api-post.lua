-- wrk script for the HTTP SMS API benchmark (docs/benchmarks.md, "The HTTP SMS API"):
-- POST /3rdparty/v1/messages as the demo user qa, a new message id for every request.
-- wrk -t1 -c8 -d10s -s bench/http-api-post.lua http://127.0.0.1:18888/
counter = 0
request = function()
  counter = counter + 1
  local body = '{"id":"b' .. math.random(1, 1e12) .. '-' .. counter ..
    '","textMessage":{"text":"Your code is 482913"},"phoneNumbers":["+628126666666"]}'
  return wrk.format("POST", "/3rdparty/v1/messages",
    {["Content-Type"] = "application/json", ["Authorization"] = "Basic cWE6NGx0MEAxMjM0"}, body)
end
