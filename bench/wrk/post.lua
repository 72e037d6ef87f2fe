-- wrk script for POST /api/kernels: 40 env vars, of which the 20 named in bench/run's
-- --client-envs are allowed; 3 of the other 20 are in envgate's default deny list, 17 are not allowed.
local allowed = {
  "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "COLUMNS", "LINES", "MPLBACKEND", "PYTHONHASHSEED",
  "PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
  "NUMEXPR_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "SPARK_HOME", "HADOOP_CONF_DIR", "JAVA_HOME",
  "GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL",
}
local other = {
  "PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD",
  "HOSTNAME", "SSH_AUTH_SOCK", "DISPLAY", "EDITOR", "PAGER", "AWS_ACCESS_KEY_ID",
  "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "JUPYTERHUB_API_TOKEN", "XDG_RUNTIME_DIR", "VIRTUAL_ENV",
}
local parts = {}
for i, n in ipairs(allowed) do
  parts[#parts + 1] = string.format('"%s": "value-of-%s-%02d/some/typical/length"', n, string.lower(n), i)
end
for i, n in ipairs(other) do
  parts[#parts + 1] = string.format('"%s": "/usr/local/bin:/usr/bin:/bin:/opt/%s/%02d"', n, string.lower(n), i)
end
wrk.method = "POST"
wrk.body = '{"name": "python3", "path": "work/notebook.ipynb", "env": {' .. table.concat(parts, ", ") .. '}}'
wrk.headers["Content-Type"] = "application/json"

-- The RESULT line bench/run reads: get.lua's done(), from the directory this script is in.
dofile((debug.getinfo(1, "S").source:sub(2):match("^(.*/)") or "./") .. "get.lua")
