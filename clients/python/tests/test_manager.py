"""EnvgateKernelManager against a fake gateway: what it fetches and what it POSTs. Needs jupyter_server 2.x."""

import asyncio
import json
import os
import unittest
from unittest import mock

try:
    from jupyter_server.gateway.gateway_client import GatewayClient

    from envgate_client import EnvgateKernelManager
    from envgate_client import manager as manager_module
except ImportError as e:  # pragma: no cover - run without jupyter_server
    raise unittest.SkipTest(f"jupyter_server 2.x not importable: {e}")


class FakeResponse:
    def __init__(self, body):
        self.body = json.dumps(body).encode()


class FakeGateway:
    """Records every request; answers kernelspec GETs from `specs` and kernel POSTs with a new kernel."""

    def __init__(self, specs):
        self.specs = specs
        self.calls = []

    async def __call__(self, url, method="GET", **kwargs):
        self.calls.append((method, url, kwargs.get("body")))
        if method == "GET":
            return FakeResponse(self.specs[url.rsplit("/", 1)[1]])
        return FakeResponse({"id": "4d4a3d1b-8c1e-4a57-9d6b-1b2c3d4e5f60", "name": "python3"})

    def posted_env(self):
        bodies = [json.loads(b) for m, _, b in self.calls if m == "POST"]
        assert len(bodies) == 1, bodies
        return bodies[0]["env"]


def kernelspec(client_envs=None):
    metadata = {} if client_envs is None else {"client_envs": client_envs}
    return {"name": "python3", "spec": {"metadata": metadata}, "resources": {}}


class StartKernel(unittest.TestCase):
    def setUp(self):
        GatewayClient.clear_instance()
        GatewayClient.instance(url="http://gateway.invalid:8888", allowed_envs="STATIC")
        self.environ = {
            "ALLOWED": "a",
            "STATIC": "s",
            "SECRET_TOKEN": "never",
            "PATH": "/usr/bin",
            "KERNEL_USERNAME": "alice",
        }
        patcher = mock.patch.dict(os.environ, self.environ, clear=True)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.addCleanup(GatewayClient.clear_instance)

    def start(self, specs, **kwargs):
        fake = FakeGateway(specs)
        with mock.patch.object(manager_module, "gateway_request", fake):
            km = EnvgateKernelManager()
            asyncio.run(km.start_kernel(kernel_name="python3", **kwargs))
        self.assertEqual(km.kernel_id, "4d4a3d1b-8c1e-4a57-9d6b-1b2c3d4e5f60")
        self.assertTrue(km.kernel_url.endswith("/api/kernels/4d4a3d1b-8c1e-4a57-9d6b-1b2c3d4e5f60"))
        return fake

    def test_sends_what_the_kernelspec_allows(self):
        fake = self.start({"python3": kernelspec(["ALLOWED", "UNSET"])}, cwd="/work/nb")
        self.assertEqual(fake.calls[0][:2], ("GET", "http://gateway.invalid:8888/api/kernelspecs/python3"))
        self.assertEqual(
            fake.posted_env(),
            {"ALLOWED": "a", "KERNEL_USERNAME": "alice", "KERNEL_WORKING_DIR": "/work/nb"},
        )

    def test_per_kernel_env_is_filtered_too(self):
        # A session passes the whole os.environ plus JPY_SESSION_NAME as `env`.
        fake = self.start(
            {"python3": kernelspec(["ALLOWED"])},
            env={**self.environ, "JPY_SESSION_NAME": "x.ipynb", "ALLOWED": "from-session"},
        )
        self.assertEqual(fake.posted_env(), {"ALLOWED": "from-session", "KERNEL_USERNAME": "alice"})

    def test_empty_policy_sends_only_kernel_names(self):
        fake = self.start({"python3": kernelspec([])})
        self.assertEqual(fake.posted_env(), {"KERNEL_USERNAME": "alice"})

    def test_no_published_policy_falls_back_to_allowed_envs(self):
        fake = self.start({"python3": kernelspec(None)})
        self.assertEqual(fake.posted_env(), {"STATIC": "s", "KERNEL_USERNAME": "alice"})

    def test_attaching_to_a_running_kernel_sends_nothing(self):
        fake = FakeGateway({})
        model = {"id": "k1", "name": "python3", "last_activity": "2026-01-01T00:00:00.000000Z",
                 "execution_state": "idle", "connections": 0}

        async def answer(url, method="GET", **kwargs):
            fake.calls.append((method, url, None))
            return FakeResponse(model)

        with mock.patch("jupyter_server.gateway.managers.gateway_request", answer), \
                mock.patch.object(manager_module, "gateway_request", answer):
            km = EnvgateKernelManager()
            asyncio.run(km.start_kernel(kernel_id="k1"))
        self.assertEqual([m for m, _, _ in fake.calls], ["GET"])
        self.assertEqual(km.kernel_id, "k1")


if __name__ == "__main__":
    unittest.main()
