-- wrk script for POST /api/kernels with a token: post.lua's body, plus the RS256 token bench/run
-- signed (BENCH_JWT) in `Authorization: Bearer`. direct and nginx ignore it; envgate verifies it.
dofile((debug.getinfo(1, "S").source:sub(2):match("^(.*/)") or "./") .. "post.lua")
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_JWT")
