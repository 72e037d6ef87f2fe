"""Which variables a kernel start sends: pure functions, no Jupyter imports.

envgate publishes, in every kernelspec it serves, ``spec.metadata.client_envs``: the sorted list of names its
policy accepts for that kernelspec. A client that sends exactly those (plus ``KERNEL_*``, which gateways always
accept) neither leaks the rest of its environment nor needs a hand-kept ``allowed_envs`` that drifts from the
gateway's policy.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

KERNEL_PREFIX = "KERNEL_"


def policy_names(kernelspec: Any) -> Optional[frozenset[str]]:
    """The names ``kernelspec`` (a ``GET /api/kernelspecs/NAME`` model) allows, or ``None`` when it publishes none.

    ``None`` (no ``client_envs`` at all) means the gateway is not telling: the caller decides on a fallback.
    A published list that is malformed counts as an empty list, so a broken gateway answer never widens what
    is sent. Non-string items are ignored for the same reason.
    """
    spec = kernelspec.get("spec") if isinstance(kernelspec, dict) else None
    metadata = spec.get("metadata") if isinstance(spec, dict) else None
    if not isinstance(metadata, dict) or "client_envs" not in metadata:
        return None
    names = metadata["client_envs"]
    if not isinstance(names, list):
        return frozenset()
    return frozenset(n for n in names if isinstance(n, str) and n)


def select_env(
    environ: Mapping[str, str], extra: Mapping[str, str], allowed: frozenset[str]
) -> dict[str, str]:
    """The ``env`` of a kernel start: ``KERNEL_*`` and ``allowed`` names, from ``environ`` then ``extra``.

    ``extra`` (the env jupyter_server passes for this kernel, e.g. a session's) wins over ``environ``, the
    same merge order jupyter_server's own GatewayKernelManager uses.
    """
    merged = dict(environ)
    merged.update(extra)
    return {k: v for k, v in merged.items() if k.startswith(KERNEL_PREFIX) or k in allowed}
