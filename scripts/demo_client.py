"""The quick-start demo client: start a kernel through envgate, ask it for its environment over
the channels WebSocket, and shut it down. Runs with the EG venv's Python (it uses only tornado,
which EG already depends on), so the demo needs nothing else installed.

Usage: python demo_client.py http://127.0.0.1:8889
"""

import asyncio
import json
import sys
import uuid

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPClientError
from tornado.websocket import websocket_connect

CODE = (
    "import os, json\n"
    "print(json.dumps({k: os.environ[k] for k in sorted(os.environ)"
    " if k.startswith(('DEMO_', 'KERNEL_USERNAME')) or k in ('PATH', 'HOME', 'EG_DEMO_SECRET')}))"
)


def message(msg_type, content):
    return {
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "demo",
                   "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "content": content, "channel": "shell", "buffers": [],
    }


async def main(base):
    http = AsyncHTTPClient()
    env = {"DEMO_ALLOWED": "reaches the kernel", "DEMO_SECRET": "dropped by envgate",
           "PATH": "/tmp/evil", "KERNEL_USERNAME": "demo"}
    print(f"POST {base}/api/kernels with env names {sorted(env)}")
    try:
        r = await http.fetch(f"{base}/api/kernels", method="POST",
                             body=json.dumps({"name": "python3", "env": env}))
    except HTTPClientError as e:
        print(f"kernel start failed: {e.code} {e.response.body.decode() if e.response else ''}")
        return 1
    kernel = json.loads(r.body)
    print(f"  -> {r.code}, kernel {kernel['id']}, decision {r.headers.get('X-Envgate-Decision')}")
    ws_url = base.replace("http", "ws", 1) + f"/api/kernels/{kernel['id']}/channels"

    async def ask(ws, msg, want, timeout):
        """Sends msg and returns (reply, stdout) once a `want` reply to it arrives; None on
        timeout or when the connection closes."""
        ws.write_message(json.dumps(msg))
        out = ""
        loop = asyncio.get_event_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            try:
                raw = await asyncio.wait_for(ws.read_message(), max(0.01, end - loop.time()))
            except asyncio.TimeoutError:
                return None
            if raw is None:
                return None
            m = json.loads(raw)
            if m.get("parent_header", {}).get("msg_id") != msg["header"]["msg_id"]:
                continue
            if m["header"]["msg_type"] == "stream":
                out += m["content"]["text"]
            if m["header"]["msg_type"] == want:
                return m, out
            # iopub's status:idle comes after every output of the request (execute_reply, on the
            # shell channel, may overtake the output).
            if want == "idle" and m["header"]["msg_type"] == "status" \
                    and m["content"].get("execution_state") == "idle":
                return m, out
        return None

    # Right after the start the kernel may not listen yet, and EG may close an early WebSocket:
    # (re)connect and ask for kernel_info until the kernel answers.
    ws = None
    loop = asyncio.get_event_loop()
    deadline = loop.time() + 60
    while loop.time() < deadline:
        try:
            ws = await websocket_connect(ws_url)
        except Exception:
            await asyncio.sleep(0.2)
            continue
        if await ask(ws, message("kernel_info_request", {}), "kernel_info_reply", 2):
            break
        ws.close()
        ws = None
        await asyncio.sleep(0.2)
    if ws is None:
        print("the kernel did not answer on its WebSocket")
        return 1
    got = await ask(ws, message("execute_request", {"code": CODE, "silent": False, "store_history": False,
                                                    "user_expressions": {}, "allow_stdin": False}),
                    "idle", 60)
    ws.close()
    out = got[1] if got else ""
    await http.fetch(f"{base}/api/kernels/{kernel['id']}", method="DELETE")
    try:
        env = json.loads(out)
    except ValueError:
        print(f"the kernel printed no environment: {out!r}")
        return 1
    print("the kernel's environment (names the demo cares about):")
    for k, v in env.items():
        print(f"  {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1].rstrip("/"))))
