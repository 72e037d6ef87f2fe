//! Running envgate for real users: reload without dropping kernels, graceful shutdown, the admin
//! listener, identity binding, an upstream token, and TLS on both sides (certificates made here
//! with rcgen). Against a real EG with real kernels.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::eg::{free_port, Eg, EgOptions};
use support::envgate::Envgate;
use support::http::{request, request_raw_on, Response};
use support::kernel::{KernelWs, Protocol};

const PRINT_ENV: &str = "import os, json; print(json.dumps(dict(os.environ)))";

fn eg_with(extra: &[(&str, &str)], token: Option<&str>) -> Eg {
    let mut extra_env: Vec<(String, String)> = vec![("EG_LIST_KERNELS".into(), "True".into())];
    extra_env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Eg::start(EgOptions {
        client_envs: vec!["*".into()],
        auth_token: token.map(str::to_string),
        extra_env,
        ..EgOptions::default()
    })
}

async fn start_kernel(addr: &str, headers: &[(&str, &str)], env: Value) -> Response {
    let body = serde_json::to_vec(&json!({"name": "python3", "env": env})).unwrap();
    request(addr, "POST", "/api/kernels", headers, &body).await.unwrap()
}

fn id_of(r: &Response) -> String {
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

async fn env_of(ws: &mut KernelWs) -> BTreeMap<String, String> {
    let out = ws.execute(PRINT_ENV).await.unwrap();
    serde_json::from_str(out.trim()).unwrap()
}

async fn open(addr: &str, id: &str, headers: &[(&str, &str)]) -> KernelWs {
    let mut ws =
        KernelWs::connect(&format!("ws://{addr}/api/kernels/{id}/channels"), headers, Protocol::Legacy).await.unwrap();
    ws.wait_ready().await.unwrap();
    ws
}

fn get<'a>(m: &'a BTreeMap<String, String>, k: &str) -> Option<&'a str> {
    m.get(k).map(String::as_str)
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_policy_for_new_starts_and_keeps_open_websockets() {
    let eg = eg_with(&[], None);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("envgate.toml");
    std::fs::write(&cfg, "client_envs = [\"FIRST\"]\n").unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let gate = Envgate::start(&eg.url, &["--config", cfg.to_str().unwrap(), "--admin-listen", &admin]);

    let id = id_of(&start_kernel(&gate.addr, &[], json!({"FIRST": "1", "SECOND": "2"})).await);
    let mut ws = open(&gate.addr, &id, &[]).await;
    let env = env_of(&mut ws).await;
    assert_eq!((get(&env, "FIRST"), get(&env, "SECOND")), (Some("1"), None));

    std::fs::write(&cfg, "client_envs = [\"SECOND\"]\n").unwrap();
    gate.signal("HUP");
    assert!(gate.wait_log("configuration reloaded"), "{}", gate.log());
    // The open WebSocket still runs code...
    assert_eq!(ws.execute("print(6 * 7)").await.unwrap().trim(), "42");
    // ...and a new start obeys the new list; kernelspecs show it too.
    let id2 = id_of(&start_kernel(&gate.addr, &[], json!({"FIRST": "1", "SECOND": "2"})).await);
    let mut ws2 = open(&gate.addr, &id2, &[]).await;
    let env = env_of(&mut ws2).await;
    assert_eq!((get(&env, "FIRST"), get(&env, "SECOND")), (None, Some("2")));
    let specs = request(&gate.addr, "GET", "/api/kernelspecs", &[], b"").await.unwrap().json();
    assert_eq!(specs["kernelspecs"]["python3"]["spec"]["metadata"]["client_envs"], json!(["SECOND"]));

    // A config that fails to load keeps the old one running, and says why.
    std::fs::write(&cfg, "mode = \"sometimes\"\n").unwrap();
    gate.signal("HUP");
    assert!(gate.wait_log("reload failed"), "{}", gate.log());
    assert!(gate.log().contains("`mode`"));
    let id3 = id_of(&start_kernel(&gate.addr, &[], json!({"SECOND": "2"})).await);
    let metrics = request(&admin, "GET", "/metrics", &[], b"").await.unwrap().text();
    assert!(metrics.contains("envgate_config_reloads_total{trigger=\"signal\",result=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains("envgate_config_reloads_total{trigger=\"signal\",result=\"error\"} 1"), "{metrics}");
    assert_eq!(ws.execute("print('still here')").await.unwrap().trim(), "still here");
    ws.close().await;
    ws2.close().await;
    for k in [id, id2, id3] {
        request(&gate.addr, "DELETE", &format!("/api/kernels/{k}"), &[], b"").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_websockets_run_for_the_grace_period_then_exits_0() {
    let eg = eg_with(&[], None);
    let mut gate = Envgate::start(&eg.url, &["--shutdown-grace", "3s"]);
    let id = id_of(&start_kernel(&gate.addr, &[], json!({})).await);
    let mut ws = open(&gate.addr, &id, &[]).await;

    gate.signal("TERM");
    assert!(gate.wait_log("shutting down"), "{}", gate.log());
    // No new connections...
    assert!(request(&gate.addr, "GET", "/api", &[], b"").await.is_err(), "envgate still accepts");
    // ...but the open WebSocket goes on during the grace period.
    assert_eq!(ws.execute("print('during grace')").await.unwrap().trim(), "during grace");
    // Then it is closed, and envgate exits 0.
    let status = gate.wait_exit(Duration::from_secs(10)).expect("envgate exits after the grace period");
    assert_eq!(status.code(), Some(0), "{}", gate.log());
    assert!(ws.execute("print(1)").await.is_err(), "the WebSocket outlived envgate");
    // The kernel itself is untouched.
    let r = request(&eg.addr, "GET", &format!("/api/kernels/{id}"), &[], b"").await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_listener_serves_health_readiness_and_metrics() {
    let eg = eg_with(&[], None);
    let admin = format!("127.0.0.1:{}", free_port());
    let gate = Envgate::start(&eg.url, &["--admin-listen", &admin, "--mode", "reject"]);
    assert_eq!(request(&admin, "GET", "/healthz", &[], b"").await.unwrap().status, 200);
    assert_eq!(request(&admin, "GET", "/readyz", &[], b"").await.unwrap().status, 200);
    let r = start_kernel(&gate.addr, &[], json!({"NOT_ALLOWED": "x", "NOT_ALLOWED_2": "y", "PATH": "/x"})).await;
    assert_eq!(r.status, 403);
    let id = id_of(&start_kernel(&gate.addr, &[], json!({"KERNEL_X": "1"})).await);
    let ws = open(&gate.addr, &id, &[]).await;
    request(&gate.addr, "GET", "/api/kernelspecs", &[], b"").await.unwrap();

    let m = request(&admin, "GET", "/metrics", &[], b"").await.unwrap();
    assert_eq!(m.status, 200);
    let text = m.text();
    for want in [
        "envgate_requests_total{route=\"kernel_start\",status=\"403\"} 1",
        "envgate_requests_total{route=\"kernel_start\",status=\"201\"} 1",
        "envgate_requests_total{route=\"kernelspec_list\",status=\"200\"} 1",
        "envgate_request_duration_seconds_bucket{le=",
        "envgate_decisions_total{event=\"kernel_start\",outcome=\"refused\",mode=\"reject\"} 1",
        "envgate_decisions_total{event=\"kernel_start\",outcome=\"forwarded\",mode=\"reject\"} 1",
        "envgate_rejected_variables_total{reason=\"not_allowed\"} 2",
        "envgate_rejected_variables_total{reason=\"denied\"} 1",
        "envgate_open_websockets 1",
        "envgate_policy_info{hash=\"",
    ] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
    // No client-chosen names or kernel ids in any label.
    assert!(!text.contains("NOT_ALLOWED") && !text.contains(&id), "{text}");
    ws.close().await;

    // Readiness follows the upstream.
    drop(eg);
    let r = request(&admin, "GET", "/readyz", &[], b"").await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(request(&admin, "GET", "/healthz", &[], b"").await.unwrap().status, 200);
    let _ = request(&gate.addr, "GET", "/api/kernels", &[], b"").await.unwrap();
    let text = request(&admin, "GET", "/metrics", &[], b"").await.unwrap().text();
    assert!(text.contains("envgate_upstream_errors_total{kind=\"connect\"}"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_binding_makes_the_trusted_user_the_kernels_user() {
    let eg = eg_with(&[], None);
    let gate = Envgate::start(&eg.url, &["--trusted-user-header", "X-Forwarded-User"]);
    // No header: refused.
    let r = start_kernel(&gate.addr, &[], json!({"KERNEL_USERNAME": "alice"})).await;
    assert_eq!(r.status, 403, "{}", r.text());
    // A different claim: refused (the default).
    let r = start_kernel(&gate.addr, &[("X-Forwarded-User", "bob")], json!({"KERNEL_USERNAME": "alice"})).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(!r.text().contains("alice"), "the error echoes the claimed value");
    // No claim: the trusted user is set.
    let id = id_of(&start_kernel(&gate.addr, &[("X-Forwarded-User", "bob")], json!({})).await);
    let mut ws = open(&gate.addr, &id, &[]).await;
    assert_eq!(get(&env_of(&mut ws).await, "KERNEL_USERNAME"), Some("bob"));
    ws.close().await;
    let recs = gate.audit(3);
    assert_eq!(recs[0]["outcome"], "refused");
    assert_eq!(recs[1]["outcome"], "refused");
    assert_eq!((recs[1]["user"].as_str(), recs[1]["user_source"].as_str()), (Some("bob"), Some("trusted_header")));
    assert_eq!((recs[2]["user"].as_str(), recs[2]["user_source"].as_str()), (Some("bob"), Some("trusted_header")));
    assert!(recs[2]["kept"].as_array().unwrap().iter().any(|k| k["source"] == "trusted_header"));

    // overwrite: the claim is replaced, and even a policy that rejects KERNEL_* cannot drop it.
    let over = Envgate::start(
        &eg.url,
        &["--trusted-user-header", "X-Forwarded-User", "--user-mismatch", "overwrite", "--kernel-prefix", "false"],
    );
    let id2 =
        id_of(&start_kernel(&over.addr, &[("X-Forwarded-User", "carol")], json!({"KERNEL_USERNAME": "root"})).await);
    let mut ws = open(&over.addr, &id2, &[]).await;
    assert_eq!(get(&env_of(&mut ws).await, "KERNEL_USERNAME"), Some("carol"));
    ws.close().await;
    // Sessions need the header too (when allowed at all).
    let s = Envgate::start(&eg.url, &["--trusted-user-header", "X-Forwarded-User", "--sessions", "allow"]);
    let body = serde_json::to_vec(&json!({"path": "a", "type": "notebook", "kernel": {"name": "python3"}})).unwrap();
    assert_eq!(request(&s.addr, "POST", "/api/sessions", &[], &body).await.unwrap().status, 403);
    for k in [id, id2] {
        request(&gate.addr, "DELETE", &format!("/api/kernels/{k}"), &[], b"").await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn envgate_can_hold_egs_token_so_clients_never_see_it() {
    let eg = eg_with(&[], Some("eg-secret-token"));
    // Without envgate's token, a tokenless client is refused by EG...
    let plain = Envgate::start(&eg.url, &[]);
    assert!(matches!(start_kernel(&plain.addr, &[], json!({})).await.status, 401 | 403));
    // ...with it, from a file, the client needs none, for HTTP and for the WebSocket.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "eg-secret-token\n").unwrap();
    let gate = Envgate::start(&eg.url, &["--upstream-token-file", token_file.to_str().unwrap()]);
    let id = id_of(&start_kernel(&gate.addr, &[], json!({"KERNEL_A": "1"})).await);
    let mut ws = open(&gate.addr, &id, &[]).await;
    let env = env_of(&mut ws).await;
    assert_eq!(get(&env, "KERNEL_A"), Some("1"));
    assert!(!env.values().any(|v| v.contains("eg-secret-token")));
    ws.close().await;
    assert!(!gate.log().contains("eg-secret-token"));
    let r = request(&gate.addr, "DELETE", &format!("/api/kernels/{id}"), &[], b"").await.unwrap();
    assert_eq!(r.status, 204);
}

/// A test PKI: a CA, a server certificate for localhost (only), and a client certificate.
struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "envgate test CA");
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("ca.key"), ca_key.serialize_pem()).unwrap();
        let pki = Pki { dir, ca };
        pki.issue("server", &["localhost"], rcgen::ExtendedKeyUsagePurpose::ServerAuth, &ca_key);
        pki.issue("client", &["envgate"], rcgen::ExtendedKeyUsagePurpose::ClientAuth, &ca_key);
        // A second, unrelated CA, for the negative case.
        let other_key = rcgen::KeyPair::generate().unwrap();
        let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(pki.path("other-ca.pem"), other.self_signed(&other_key).unwrap().pem()).unwrap();
        pki
    }

    fn issue(&self, name: &str, sans: &[&str], usage: rcgen::ExtendedKeyUsagePurpose, ca_key: &rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, sans[0]);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.ca, ca_key).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).to_str().unwrap().to_string()
    }

    /// A rustls client trusting this CA.
    fn client(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

async fn https(addr: &str, tls: Arc<rustls::ClientConfig>, method: &str, path: &str, body: &[u8]) -> Response {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    request_raw_on(stream, &raw, false).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_listener_serves_https_and_wss() {
    let pki = Pki::new();
    let eg = eg_with(&[], None);
    let gate = Envgate::start(
        &eg.url,
        &["--tls-cert", &pki.path("server.pem"), "--tls-key", &pki.path("server.key"), "--client-envs", "TLS_OK"],
    );
    let specs = https(&gate.addr, pki.client(), "GET", "/api/kernelspecs", b"").await;
    assert_eq!(specs.status, 200, "{}", specs.text());
    assert_eq!(specs.json()["kernelspecs"]["python3"]["spec"]["metadata"]["client_envs"], json!(["TLS_OK"]));
    let body = serde_json::to_vec(&json!({"name": "python3", "env": {"TLS_OK": "y", "NO": "n"}})).unwrap();
    let r = https(&gate.addr, pki.client(), "POST", "/api/kernels", &body).await;
    let id = id_of(&r);
    let port = gate.addr.rsplit(':').next().unwrap();
    let url = format!("wss://localhost:{port}/api/kernels/{id}/channels");
    let mut ws = KernelWs::connect_with(&url, &[], Protocol::V1, Some(pki.client())).await.unwrap();
    ws.wait_ready().await.unwrap();
    let env = env_of(&mut ws).await;
    assert_eq!((get(&env, "TLS_OK"), get(&env, "NO")), (Some("y"), None));
    ws.close().await;
    // Plain HTTP to the TLS port gets nothing useful.
    assert!(request(&gate.addr, "GET", "/api/kernelspecs", &[], b"").await.map_or(true, |r| r.status != 200));
    let rec = &gate.audit(1)[0];
    assert_eq!(rec["kernel_id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn https_upstream_is_verified_with_mutual_tls() {
    let pki = Pki::new();
    let eg = eg_with(
        &[
            ("EG_CERTFILE", &pki.path("server.pem")),
            ("EG_KEYFILE", &pki.path("server.key")),
            ("EG_CLIENT_CA", &pki.path("ca.pem")),
        ],
        None,
    );
    let upstream = format!("https://localhost:{}", eg.port);
    let mtls = [
        "--upstream-ca",
        &pki.path("ca.pem"),
        "--upstream-client-cert",
        &pki.path("client.pem"),
        "--upstream-client-key",
        &pki.path("client.key"),
        "--client-envs",
        "MTLS_OK",
    ];
    let gate = Envgate::start(&upstream, &mtls);
    let id = id_of(&start_kernel(&gate.addr, &[], json!({"MTLS_OK": "1", "NO": "2"})).await);
    let mut ws = open(&gate.addr, &id, &[]).await;
    let env = env_of(&mut ws).await;
    assert_eq!((get(&env, "MTLS_OK"), get(&env, "NO")), (Some("1"), None));
    ws.close().await;

    // Without the client certificate EG refuses the handshake; with the wrong CA envgate does.
    let no_client = Envgate::start(&upstream, &["--upstream-ca", &pki.path("ca.pem")]);
    let r = request(&no_client.addr, "GET", "/api/kernelspecs", &[], b"").await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let wrong_ca = Envgate::start(&upstream, &["--upstream-ca", &pki.path("other-ca.pem")]);
    let r = request(&wrong_ca.addr, "GET", "/api/kernelspecs", &[], b"").await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    // Hostname checking: the certificate names localhost, not 127.0.0.1.
    let wrong_name = format!("https://127.0.0.1:{}", eg.port);
    let other = Envgate::start(&wrong_name, &mtls);
    let r = request(&other.addr, "GET", "/api/kernelspecs", &[], b"").await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    // --upstream-insecure skips verification (and says so at start-up).
    let insecure = Envgate::start(
        &wrong_name,
        &[
            "--upstream-insecure",
            "--upstream-client-cert",
            &pki.path("client.pem"),
            "--upstream-client-key",
            &pki.path("client.key"),
        ],
    );
    assert!(insecure.log().contains("NOT verified"), "{}", insecure.log());
    let r = request(&insecure.addr, "GET", "/api/kernelspecs", &[], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    request(&gate.addr, "DELETE", &format!("/api/kernels/{id}"), &[], b"").await.unwrap();
}
