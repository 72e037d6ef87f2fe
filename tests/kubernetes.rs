//! Checks deploy/kubernetes/: every manifest against the Kubernetes JSON schemas, and that the sidecar
//! deployment holds what it must (the Service reaches envgate only, EG on loopback, probes, a locked-down
//! container, a grace period longer than envgate's drain).
//!
//! The validator is the PyPI package kubernetes-validate (pinned in tests/kubernetes/requirements.txt), in
//! strict mode, so an unknown or misspelled field fails; installed by scripts/py-venv into a venv under
//! `${ENVGATE_CACHE_DIR:-$HOME/.cache/envgate}` on first use (needs PyPI once, about 25 MB).
//! tests/kubernetes/manifests.py parses the YAML, validates it and prints everything as JSON; the
//! assertions are here. For the Helm chart, which has no value for a sidecar, the same script renders EG's
//! chart Deployment and Service with deploy/kubernetes/helm-values-envgate.yaml and applies the
//! post-renderer's patch (deploy/kubernetes/helm/), and both results go through the same checks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// The Kubernetes release whose API schemas the manifests must satisfy.
const KUBERNETES_VERSION: &str = "1.30";
/// envgate's client port, admin port and drain time, as its sidecar is started.
const ENVGATE_PORT: i64 = 8889;
const ADMIN_PORT: i64 = 9464;
const EG_PORT: i64 = 8888;
const SHUTDOWN_GRACE_SECS: i64 = 30;
const ENVGATE_ARGS: [&str; 10] = [
    "--listen",
    "0.0.0.0:8889",
    "--upstream",
    "http://127.0.0.1:8888",
    "--config",
    "/etc/envgate/envgate.toml",
    "--admin-listen",
    "0.0.0.0:9464",
    "--shutdown-grace",
    "30s",
];
const EG_IMAGE: &str = "elyra/enterprise-gateway:3.3.0";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifests_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// The venv with kubernetes-validate, built once per machine (scripts/py-venv locks and caches it).
fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("scripts/py-venv"))
            .arg("kubernetes-validate")
            .arg(repo().join("tests/kubernetes/requirements.txt"))
            .arg("--check")
            .arg("import kubernetes_validate")
            .output()
            .expect("cannot run scripts/py-venv");
        assert!(
            out.status.success(),
            "scripts/py-venv kubernetes-validate failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert!(path.join("bin/python").exists(), "py-venv printed {path:?}");
        path
    })
}

/// Runs tests/kubernetes/manifests.py over `dir` (deploy/kubernetes or a copy of it).
fn load(dir: &Path) -> Value {
    let out = Command::new(venv().join("bin/python"))
        .arg(repo().join("tests/kubernetes/manifests.py"))
        .arg(KUBERNETES_VERSION)
        .arg(dir)
        .output()
        .expect("cannot run tests/kubernetes/manifests.py");
    assert!(out.status.success(), "manifests.py failed ({}):\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("manifests.py printed no JSON")
}

fn shipped() -> &'static Value {
    static SHIPPED: OnceLock<Value> = OnceLock::new();
    SHIPPED.get_or_init(|| load(&manifests_dir()))
}

/// The one document of `kind` in `file`.
fn doc<'a>(all: &'a Value, file: &str, kind: &str) -> &'a Value {
    let docs = all["files"][file].as_array().unwrap_or_else(|| panic!("no {file} in deploy/kubernetes"));
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "{file} should hold one {kind}, holds {}", found.len());
    found[0]
}

fn helm_rendered<'a>(all: &'a Value, kind: &str) -> &'a Value {
    all["helm_rendered"]
        .as_array()
        .and_then(|docs| docs.iter().find(|d| d["kind"] == kind))
        .unwrap_or_else(|| panic!("no rendered {kind} for the Helm chart"))
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("the Deployment has no container {name}"))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"].as_array()?.iter().find(|e| e["name"] == name)?["value"].as_str()
}

/// The number a probe or Service port names: an integer, or a port name of `container`.
fn resolve_port(container: &Value, port: &Value) -> Option<i64> {
    match port {
        Value::Number(n) => n.as_i64(),
        Value::String(name) => {
            container["ports"].as_array()?.iter().find(|p| &p["name"] == name)?["containerPort"].as_i64()
        }
        _ => None,
    }
}

#[test]
fn every_manifest_is_valid_kubernetes() {
    let all = shipped();
    let results = all["validation"].as_array().unwrap();
    let failed: Vec<_> = results.iter().filter(|r| !r["error"].is_null()).collect();
    assert!(failed.is_empty(), "invalid against Kubernetes {KUBERNETES_VERSION}: {failed:#?}");
    for r in results {
        assert_eq!(r["schema"], KUBERNETES_VERSION, "validated against another version: {r}");
    }

    // Everything kustomize applies was validated, and kustomization.yaml lists every manifest beside it.
    let kustomization = doc(all, "kustomization.yaml", "Kustomization");
    let listed: BTreeSet<&str> =
        kustomization["resources"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    let on_disk: BTreeSet<&str> = all["files"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .filter(|f| !f.contains('/') && *f != "kustomization.yaml" && *f != "helm-values-envgate.yaml")
        .collect();
    assert_eq!(listed, on_disk, "kustomization.yaml resources differ from the manifests in deploy/kubernetes");
    let validated: BTreeSet<&str> = results.iter().map(|r| r["source"].as_str().unwrap()).collect();
    for file in &listed {
        assert!(validated.contains(file), "{file} was not validated");
    }
    // The Helm route: the chart's Deployment with the sidecar patched in, and its Service.
    let helm: Vec<_> = results.iter().filter(|r| r["source"] == "helm-rendered").map(|r| &r["kind"]).collect();
    assert_eq!(helm, ["Deployment", "Service"], "the Helm chart's output was not validated");
}

/// What both deployments (kustomize and Helm) must hold.
fn check_sidecar_pod(deployment: &Value, service: &Value, what: &str) {
    let pod = &deployment["spec"]["template"]["spec"];
    let eg = container(deployment, "enterprise-gateway");
    let envgate = container(deployment, "envgate");

    // EG: loopback only, its own filter off (safe only because of the former), pinned image.
    assert_eq!(env(eg, "EG_IP"), Some("127.0.0.1"), "{what}: EG does not bind 127.0.0.1");
    assert_eq!(env(eg, "EG_PORT"), Some("8888"), "{what}: EG_PORT");
    assert_eq!(env(eg, "EG_CLIENT_ENVS"), Some("*"), "{what}: EG_CLIENT_ENVS is not '*'");
    assert_eq!(eg["image"], EG_IMAGE, "{what}: EG image");

    // envgate: started as documented, pointed at EG on loopback.
    let args: Vec<&str> = envgate["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args, ENVGATE_ARGS, "{what}: envgate args");
    assert!(envgate.get("command").is_none(), "{what}: command replaces the image's entrypoint");
    assert_eq!(resolve_port(envgate, &Value::from("envgate")), Some(ENVGATE_PORT), "{what}: envgate port");
    assert_eq!(resolve_port(envgate, &Value::from("admin")), Some(ADMIN_PORT), "{what}: admin port");

    // Probes on the admin listener.
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &envgate[probe]["httpGet"];
        assert_eq!(get["path"], path, "{what}: {probe} path");
        assert_eq!(resolve_port(envgate, &get["port"]), Some(ADMIN_PORT), "{what}: {probe} port");
    }

    // Requests and limits for both resources.
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(envgate["resources"][kind][res].is_string(), "{what}: envgate has no {kind}.{res}");
        }
    }

    // A non-root, read-only, capability-less container (seccomp set on it or inherited from the pod).
    let sc = &envgate["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true, "{what}: runAsNonRoot");
    assert_eq!(sc["runAsUser"], 65532, "{what}: runAsUser");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}: readOnlyRootFilesystem");
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}: allowPrivilegeEscalation");
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]), "{what}: capabilities.drop");
    let seccomp = sc["seccompProfile"]["type"].as_str().or(pod["securityContext"]["seccompProfile"]["type"].as_str());
    assert_eq!(seccomp, Some("RuntimeDefault"), "{what}: seccompProfile");
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{what}: pod seccompProfile");

    // The config: --config lies in a read-only mount of the ConfigMap volume, mounted whole (a subPath mount
    // never sees an edited ConfigMap).
    let mount = envgate["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/etc/envgate")
        .unwrap_or_else(|| panic!("{what}: nothing mounted at /etc/envgate"));
    assert_eq!(mount["readOnly"], true, "{what}: config mount is writable");
    assert!(mount.get("subPath").is_none(), "{what}: config mounted with subPath");
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    assert_eq!(volume["configMap"]["name"], "envgate-config", "{what}: config volume is not the ConfigMap");

    // Kubernetes must wait for envgate's drain before it kills the pod.
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap_or(30);
    assert!(grace > SHUTDOWN_GRACE_SECS, "{what}: terminationGracePeriodSeconds {grace} <= --shutdown-grace");

    // The Service selects this pod and reaches envgate, never EG.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[key], value, "{what}: the Service selector {key} does not match the pod");
    }
    let ports = service["spec"]["ports"].as_array().unwrap();
    let http = ports.iter().find(|p| p["name"] == "http").unwrap_or_else(|| panic!("{what}: no http port"));
    assert_eq!(resolve_port(envgate, &http["targetPort"]), Some(ENVGATE_PORT), "{what}: http targets {http}");
    for p in ports {
        let target = resolve_port(envgate, &p["targetPort"]).or_else(|| resolve_port(eg, &p["targetPort"]));
        assert_ne!(target, Some(EG_PORT), "{what}: Service port {p} reaches EG's port");
    }
}

#[test]
fn kustomize_deployment_puts_envgate_in_front_of_eg() {
    let all = shipped();
    let deployment = doc(all, "deployment.yaml", "Deployment");
    check_sidecar_pod(deployment, doc(all, "service.yaml", "Service"), "deployment.yaml");

    // Here EG declares no port for its API at all, and only EG holds the service account token.
    let eg = container(deployment, "enterprise-gateway");
    let eg_ports: Vec<_> =
        eg["ports"].as_array().map(|p| p.iter().map(|p| &p["containerPort"]).collect()).unwrap_or_default();
    assert!(!eg_ports.contains(&&Value::from(EG_PORT)), "EG declares its port: {eg_ports:?}");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false, "the token is mounted into envgate too");
    let envgate = container(deployment, "envgate");
    assert!(
        !envgate["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"].as_str().unwrap().starts_with("/var/run/secrets")),
        "envgate mounts service account credentials"
    );

    // The pieces refer to each other by the right names.
    let sa = doc(all, "serviceaccount.yaml", "ServiceAccount");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    let binding = doc(all, "rbac.yaml", "ClusterRoleBinding");
    let kustomization = doc(all, "kustomization.yaml", "Kustomization");
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    assert_eq!(
        binding["subjects"][0]["namespace"], kustomization["namespace"],
        "rbac.yaml binds a service account in another namespace than kustomization.yaml deploys to"
    );
    assert_eq!(doc(all, "namespace.yaml", "Namespace")["metadata"]["name"], kustomization["namespace"]);
    assert_eq!(doc(all, "configmap.yaml", "ConfigMap")["metadata"]["name"], "envgate-config");
}

#[test]
fn helm_values_and_post_renderer_put_envgate_in_front_of_eg() {
    let all = shipped();
    let deployment = helm_rendered(all, "Deployment");
    check_sidecar_pod(deployment, helm_rendered(all, "Service"), "Helm chart + helm-values-envgate.yaml");

    // The patch adds the very container deployment.yaml runs, so the two routes cannot drift apart.
    let kustomize = container(doc(all, "deployment.yaml", "Deployment"), "envgate");
    assert_eq!(container(deployment, "envgate"), kustomize, "the Helm patch's envgate container differs");
    let values = &all["files"]["helm-values-envgate.yaml"][0];
    assert_eq!(values["image"], EG_IMAGE);

    // The post-renderer adds the ConfigMap the patch mounts.
    let script = std::fs::read_to_string(manifests_dir().join("helm/post-render")).unwrap();
    assert!(script.contains("configmap.yaml") && script.contains("envgate-sidecar-patch.yaml"));
}

#[test]
fn configmap_holds_a_valid_envgate_config() {
    let configmap = doc(shipped(), "configmap.yaml", "ConfigMap");
    let text = configmap["data"]["envgate.toml"].as_str().expect("the ConfigMap has no envgate.toml");
    // The file the sidecar's --config names.
    assert!(ENVGATE_ARGS.contains(&"/etc/envgate/envgate.toml"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envgate.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_envgate")).arg("check").arg("--config").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "envgate check rejects the ConfigMap's envgate.toml ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: toml::Table = text.parse().unwrap();
    assert_eq!(cfg["upstream"].as_str(), Some("http://127.0.0.1:8888"));
    assert_eq!(cfg["listen"].as_str(), Some("0.0.0.0:8889"));
    assert_eq!(cfg["audit_log"].as_str(), Some("-"), "audit records must go to stdout (kubectl logs)");
    // The file adds to the built-in deny list rather than copying it (a copy would miss later additions).
    assert!(!cfg.contains_key("deny_envs"), "the ConfigMap replaces the built-in deny list");
    assert!(cfg.contains_key("extra_deny_envs"));
    // On Kubernetes these KERNEL_* names pick a kernel pod's image, namespace, account and volumes: the
    // merged list in force, as `envgate check` prints it.
    let effective: toml::Table = String::from_utf8_lossy(&out.stdout).parse().unwrap();
    let deny: Vec<&str> = effective["deny_envs"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    for name in ["KERNEL_IMAGE", "KERNEL_NAMESPACE", "KERNEL_SERVICE_ACCOUNT_NAME", "KERNEL_VOLUMES", "PATH"] {
        assert!(deny.contains(&name), "{name} is not in deny_envs");
    }
}

#[test]
fn broken_manifests_are_rejected() {
    // Guards against a validator that accepts anything: a misspelled field in a manifest, and one in the Helm
    // patch (checked only once merged into the chart's Deployment), must each fail and be named.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("kubernetes");
    copy_dir(&manifests_dir(), &copy);
    let cases = [
        ("deployment.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesytem: true", "readOnlyRootFilesytem"),
        ("helm/envgate-sidecar-patch.yaml", "periodSeconds: 5\n", "periodSecond: 5\n", "periodSecond'"),
        ("service.yaml", "sessionAffinity: ClientIP", "sessionAffinity: [ClientIP]", "sessionAffinity"),
    ];
    for (file, from, to, _) in cases {
        let path = copy.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches(from).count(), 1, "cannot break {file} at {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    }
    let broken = load(&copy);
    let errors: Vec<String> = broken["validation"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| Some(format!("{}: {}", r["source"].as_str()?, r["error"].as_str()?)))
        .collect();
    for (file, _, _, expect) in cases {
        let source = if file.starts_with("helm/") { "helm-rendered" } else { file };
        assert!(
            errors.iter().any(|e| e.starts_with(source) && e.contains(expect)),
            "breaking {file} with {expect} went unnoticed: {errors:#?}"
        );
    }
    assert_eq!(errors.len(), cases.len(), "unexpected errors: {errors:#?}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
