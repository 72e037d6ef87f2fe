"""The jupyter_server 2.x hook: a GatewayKernelManager that asks the gateway what it may send.

jupyter_server's ``GatewayKernelManager.start_kernel`` builds the start body's ``env`` from ``os.environ`` plus
the per-kernel env, keeping ``KERNEL_*`` and the names in ``GatewayClient.allowed_envs``; that filter is inline,
so this subclass replaces the new-kernel branch of ``start_kernel`` (same body, same request) and only changes
where the allowed names come from: the kernelspec's ``spec.metadata.client_envs``, fetched from the gateway at
every start, so a policy change on the gateway applies to the next kernel without touching the client.
"""

from __future__ import annotations

import os

from jupyter_server.gateway.gateway_client import GatewayClient, gateway_request
from jupyter_server.gateway.managers import GatewayKernelManager
from jupyter_server.utils import url_path_join
from tornado.escape import json_decode, json_encode, url_escape

from .policy import policy_names, select_env

try:  # jupyter_server >= 2.6 emits kernel action events from a decorator on start_kernel
    from jupyter_server.services.kernels.kernelmanager import emit_kernel_action_event
except ImportError:  # pragma: no cover - older 2.x

    def emit_kernel_action_event(success_msg=""):
        return lambda method: method


# The stock method without its event decorator, so reconnecting does not emit the event twice.
_stock_start_kernel = getattr(
    GatewayKernelManager.start_kernel, "__wrapped__", GatewayKernelManager.start_kernel
)


class EnvgateKernelManager(GatewayKernelManager):
    """Sends exactly the variables the gateway's kernelspec allows (``spec.metadata.client_envs``) plus
    ``KERNEL_*``, from the server's environment.

    When the gateway publishes no ``client_envs`` for the kernelspec (it is not behind envgate), falls back to
    ``GatewayClient.allowed_envs``, i.e. the stock behaviour.
    """

    @emit_kernel_action_event(success_msg="Kernel {kernel_id} was started.")
    async def start_kernel(self, **kwargs):
        if kwargs.get("kernel_id") is not None:
            # Attaching to a running kernel sends no env: the stock code is right as it is.
            return await _stock_start_kernel(self, **kwargs)

        gateway = GatewayClient.instance()
        kernel_name = kwargs.get("kernel_name", "python3")
        # As the stock code: KERNEL_USERNAME from the environment wins over http_user.
        if os.environ.get("KERNEL_USERNAME") is None and gateway.http_user:
            os.environ["KERNEL_USERNAME"] = gateway.http_user or ""

        allowed = await self.allowed_names(kernel_name)
        env = select_env(os.environ, kwargs.get("env") or {}, allowed)
        if kwargs.get("cwd") is not None and env.get("KERNEL_WORKING_DIR") is None:
            env["KERNEL_WORKING_DIR"] = kwargs["cwd"]
        # Names only: values may be secrets.
        self.log.info("envgate_client: starting %s with env names %s", kernel_name, sorted(env))

        response = await gateway_request(
            self.kernels_url,
            method="POST",
            headers={"Content-Type": "application/json"},
            body=json_encode({"name": kernel_name, "env": env}),
        )
        self.kernel = json_decode(response.body)
        self.kernel_id = self.kernel["id"]
        self.kernel_url = url_path_join(self.kernels_url, url_escape(str(self.kernel_id)))
        self.log.info("EnvgateKernelManager started kernel: %s", self.kernel_id)

    async def allowed_names(self, kernel_name: str) -> frozenset[str]:
        """The names the gateway allows for ``kernel_name``, fetched now (never cached: the policy may change).

        Uses ``GET {kernelspecs_endpoint}/{name}`` through jupyter_server's ``gateway_request``, so the
        request carries the same token, headers and TLS settings as every other gateway call.
        """
        gateway = GatewayClient.instance()
        url = url_path_join(gateway.url or "", gateway.kernelspecs_endpoint, url_escape(kernel_name))
        response = await gateway_request(url, method="GET")
        names = policy_names(json_decode(response.body))
        if names is None:
            self.log.warning(
                "envgate_client: the gateway publishes no client_envs for %s; using allowed_envs", kernel_name
            )
            return frozenset(n for n in gateway.allowed_envs.split(",") if n)
        return names
