"""envgate-client: a jupyter_server 2.x gateway client that learns its env policy from the gateway.

Enable with one line of Jupyter server configuration::

    c.GatewayMappingKernelManager.kernel_manager_class = "envgate_client.EnvgateKernelManager"

The pure selection logic lives in :mod:`envgate_client.policy` (no Jupyter imports), the Jupyter hook in
:mod:`envgate_client.manager`; the manager is imported lazily so the policy module works without jupyter_server.
"""

from .policy import KERNEL_PREFIX, policy_names, select_env

__all__ = ["EnvgateKernelManager", "KERNEL_PREFIX", "policy_names", "select_env"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that importing the package (e.g. for its policy functions) does not pull in jupyter_server.
    if name == "EnvgateKernelManager":
        from .manager import EnvgateKernelManager

        return EnvgateKernelManager
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
