"""Loads and validates envgate's Kubernetes manifests for tests/kubernetes.rs.

    python manifests.py KUBERNETES_VERSION DIR

DIR is deploy/kubernetes (or a copy of it). Prints one JSON object on stdout:

    {"kubernetes_validate": "1.37.0",
     "files": {"deployment.yaml": [doc, ...], ...},        every *.yaml under DIR, parsed
     "helm_rendered": [deployment, service],                EG's chart 3.3.0 as rendered with
                                                            helm-values-envgate.yaml, after helm/post-render's patch
     "validation": [{"source", "kind", "name", "schema", "error"}, ...]}

Every document with apiVersion and kind is validated against the Kubernetes JSON schemas of
kubernetes-validate in strict mode (unknown fields fail), except the Kustomization (no schema there) and the
strategic-merge patch (a partial Deployment: it is validated merged, as part of "helm_rendered"). An unknown
kind is an error too, where the kubernetes-validate CLI would only warn. The Rust test asserts on all of it;
this script only exits non-zero when it cannot do its job (a file that is not YAML, a bad argument).
"""

import copy
import json
import pathlib
import sys

import yaml

import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

PATCH_SUFFIX = "-patch.yaml"


def load_files(root):
    files = {}
    for path in sorted(root.rglob("*.yaml")):
        rel = path.relative_to(root).as_posix()
        with open(path) as f:
            files[rel] = [doc for doc in yaml.safe_load_all(f) if doc is not None]
    return files


def validate(doc, version):
    """(schema version used, error or None)."""
    try:
        return kubernetes_validate.validate(doc, version, strict=True), None
    except ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        return e.version, f"{where}: {e.message}"
    except SchemaNotFoundError as e:
        return None, f"no schema: {e.message}"


# ---- EG's Helm chart, rendered -------------------------------------------------------------------------
# A transcription of what etc/kubernetes/helm/enterprise-gateway/templates/{deployment,service}.yaml (chart
# 3.3.0) produce for the values they read; the chart's defaults are those of its values.yaml. Helm is not
# available to the tests (no network beyond the package registries), so this stands in for `helm template`.
# It renders only what those templates render: one container, no extra volumes (the chart has no value for
# either), which is why the sidecar comes from helm/post-render.

CHART_DEFAULTS = {
    "image": "elyra/enterprise-gateway:dev",
    "imagePullPolicy": "IfNotPresent",
    "service": {
        "type": "NodePort",
        "ports": [
            {"name": "http", "port": 8888, "targetPort": 8888},
            {"name": "http-response", "port": 8877, "targetPort": 8877},
        ],
    },
    "deployment": {
        "serviceAccountName": "enterprise-gateway-sa",
        "terminationGracePeriodSeconds": 30,
        "resources": {},
        "replicas": 1,
        "extraEnv": {},
    },
    "logLevel": "DEBUG",
    "mirrorWorkingDirs": False,
    "kernel": {
        "clusterRole": "kernel-controller",
        "shareGatewayNamespace": False,
        "launchTimeout": 60,
        "cullIdleTimeout": 3600,
        "allowedKernels": ["r_kubernetes", "python_kubernetes"],
        "defaultKernelName": "python_kubernetes",
    },
}


def merge_values(base, override):
    """Helm's values merge: maps merge key by key, anything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def render_chart(values, namespace="enterprise-gateway", release="enterprise-gateway"):
    v = merge_values(CHART_DEFAULTS, values)
    ports = v["service"]["ports"]
    labels = {"app": "enterprise-gateway", "component": "enterprise-gateway"}
    env = [
        {"name": "EG_PORT", "value": str(ports[0]["port"])},
        {"name": "EG_RESPONSE_PORT", "value": str(ports[1]["port"])},
        {"name": "EG_NAMESPACE", "value": namespace},
        {"name": "EG_KERNEL_CLUSTER_ROLE", "value": v["kernel"]["clusterRole"]},
        {"name": "EG_SHARED_NAMESPACE", "value": "True" if v["kernel"]["shareGatewayNamespace"] else "False"},
        {"name": "EG_MIRROR_WORKING_DIRS", "value": "True" if v["mirrorWorkingDirs"] else "False"},
        {"name": "EG_CULL_IDLE_TIMEOUT", "value": str(v["kernel"]["cullIdleTimeout"])},
        {"name": "EG_LOG_LEVEL", "value": v["logLevel"]},
        {"name": "EG_KERNEL_LAUNCH_TIMEOUT", "value": str(v["kernel"]["launchTimeout"])},
        {"name": "EG_ALLOWED_KERNELS", "value": "'" + json.dumps(v["kernel"]["allowedKernels"]) + "'"},
        {"name": "EG_DEFAULT_KERNEL_NAME", "value": v["kernel"]["defaultKernelName"]},
    ]
    env += [{"name": k, "value": str(val)} for k, val in v["deployment"]["extraEnv"].items()]
    container = {
        "name": "enterprise-gateway",
        "image": v["image"],
        "imagePullPolicy": v["imagePullPolicy"],
        "env": env,
        "ports": [{"containerPort": ports[0]["port"]}, {"containerPort": ports[1]["port"]}],
    }
    if v["deployment"]["resources"]:
        container["resources"] = v["deployment"]["resources"]
    chart_labels = dict(labels, chart="enterprise-gateway-3.3.0", release=release, heritage="Helm")
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "enterprise-gateway",
            "namespace": namespace,
            "labels": dict(chart_labels, **{"gateway-selector": "enterprise-gateway"}),
        },
        "spec": {
            "replicas": v["deployment"]["replicas"],
            "selector": {"matchLabels": {"gateway-selector": "enterprise-gateway"}},
            "template": {
                "metadata": {"labels": dict(labels, **{"gateway-selector": "enterprise-gateway"})},
                "spec": {
                    "serviceAccountName": v["deployment"]["serviceAccountName"],
                    "terminationGracePeriodSeconds": v["deployment"]["terminationGracePeriodSeconds"],
                    "containers": [container],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "enterprise-gateway", "namespace": namespace, "labels": chart_labels},
        "spec": {
            # Every key of every service.ports entry, copied as is.
            "ports": [dict(p) for p in ports],
            "selector": {"gateway-selector": "enterprise-gateway"},
            "sessionAffinity": "ClientIP",
            "type": v["service"]["type"],
        },
    }
    return deployment, service


# Strategic merge (what kustomize does with a patch of a Deployment): lists of these keys merge element by
# element on the given field; other lists are replaced; maps merge recursively.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def strategic_merge(base, patch):
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS and isinstance(out.get(key), list):
            field = MERGE_KEYS[key]
            merged = list(out[key])
            for item in value:
                at = next((i for i, old in enumerate(merged) if old.get(field) == item.get(field)), None)
                if at is None:
                    merged.append(copy.deepcopy(item))
                else:
                    merged[at] = strategic_merge(merged[at], item)
            out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    return out


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: manifests.py KUBERNETES_VERSION DIR")
    version, root = sys.argv[1], pathlib.Path(sys.argv[2])
    files = load_files(root)

    validation = []

    def check(source, doc):
        schema, error = validate(doc, version)
        validation.append({
            "source": source,
            "kind": doc.get("kind"),
            "name": (doc.get("metadata") or {}).get("name"),
            "schema": schema,
            "error": error,
        })

    for rel, docs in files.items():
        for doc in docs:
            if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
                continue  # helm values
            if doc["kind"] == "Kustomization" or rel.endswith(PATCH_SUFFIX):
                continue
            check(rel, doc)

    helm_rendered = []
    values = files.get("helm-values-envgate.yaml", [None])[0]
    patch = files.get("helm/envgate-sidecar" + PATCH_SUFFIX, [None])[0]
    if values is not None and patch is not None:
        deployment, service = render_chart(values)
        deployment = strategic_merge(deployment, patch)
        helm_rendered = [deployment, service]
        for doc in helm_rendered:
            check("helm-rendered", doc)

    json.dump({
        "kubernetes_validate": kubernetes_validate.__version__,
        "files": files,
        "helm_rendered": helm_rendered,
        "validation": validation,
    }, sys.stdout)


if __name__ == "__main__":
    main()
