//! End to end, per-user and per-group policy: a real Enterprise Gateway 3.3.0 with real kernels,
//! envgate in front with identity from a trusted proxy's headers or from tokens signed in the
//! test. What reaches a kernel is read from inside the kernel; what must not start is checked on
//! EG's own kernel list.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};
use support::eg::{Eg, EgOptions};
use support::envgate::Envgate;
use support::http::{request, Response};
use support::jwt::{self, Keys, Kind};
use support::kernel::{run_code, Protocol};

const PRINT_ENV: &str = "import os, json; print(json.dumps(dict(os.environ)))";

/// EG as the README configures it behind envgate: it forwards whatever it is sent, lists kernels
/// (so that the tests can see that none started), and serves a third kernelspec, `spark`.
fn eg() -> Eg {
    Eg::start(EgOptions {
        client_envs: vec!["*".into()],
        extra_env: vec![("EG_LIST_KERNELS".into(), "True".into())],
        kernelspecs: vec![(
            "spark".into(),
            json!({"argv": ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "Spark (envgate test)", "language": "python"}),
        )],
        ..EgOptions::default()
    })
}

async fn send(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &Value) -> Response {
    let body = if body.is_null() { Vec::new() } else { serde_json::to_vec(body).unwrap() };
    let mut h: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    request(addr, method, path, &h, &body).await.unwrap()
}

async fn start(addr: &str, headers: &[(&str, &str)], body: &Value) -> Response {
    send(addr, "POST", "/api/kernels", headers, body).await
}

async fn started_id(r: &Response) -> String {
    assert_eq!(r.status, 201, "kernel start: {}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// The kernels EG runs, asked of EG itself.
async fn eg_kernels(eg: &Eg) -> usize {
    let r = request(&eg.addr, "GET", "/api/kernels", &[], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().as_array().unwrap().len()
}

async fn kernel_env(gate: &Envgate, id: &str, headers: &[(&str, &str)]) -> BTreeMap<String, String> {
    let url = format!("ws://{}/api/kernels/{id}/channels", gate.addr);
    let out = run_code(&url, headers, Protocol::V1, PRINT_ENV).await.unwrap_or_else(|e| panic!("{url}: {e}"));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("kernel printed no JSON ({e}): {out}"))
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn by_name(list: &Value, field: &str) -> BTreeMap<String, String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|k| (k["name"].as_str().unwrap().into(), k[field].as_str().unwrap().into()))
        .collect()
}

fn pairs(p: &[(&str, &str)]) -> BTreeMap<String, String> {
    p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

/// The audit record of the response's decision.
fn record_of(gate: &Envgate, r: &Response) -> Value {
    let id = r.header("x-envgate-decision").unwrap_or_else(|| panic!("no decision id: {}", r.text())).to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if let Some(rec) = gate.audit(0).into_iter().find(|rec| rec["id"] == id.as_str()) {
            return rec;
        }
        assert!(std::time::Instant::now() < deadline, "no audit record {id}:\n{}", gate.audit_text());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The policy of the header tests: data-eng may send `SPARK_*` and start `spark` and
/// `python3`; analysts may send `ANALYST_VAR` and start only `python3`; every kernel runs in
/// `jupyter-<user>`; data-eng kernels get a service account.
const HEADER_POLICY: &str = r#"
trusted_user_header = "X-Forwarded-User"
trusted_groups_header = "X-Forwarded-Groups"
client_envs = ["EVERYONE_VAR"]

[set_envs]
KERNEL_NAMESPACE = "jupyter-{user_dns}"

[groups.data-eng]
allow_prefixes = ["SPARK_"]
kernelspecs = ["spark", "python3"]
[groups.data-eng.set_envs]
KERNEL_SERVICE_ACCOUNT_NAME = "spark-runner"

[groups.analysts]
client_envs = ["ANALYST_VAR"]
deny_envs = ["EVERYONE_VAR"]
kernelspecs = ["python3"]

[users.carol]
client_envs = ["CAROL_VAR"]
"#;

/// What every user sends: one name for each block, and values of their own for nothing envgate sets.
fn body(kernelspec: &str) -> Value {
    json!({"name": kernelspec, "env": {
        "SPARK_HOME": "/opt/spark", "ANALYST_VAR": "a", "EVERYONE_VAR": "e", "CAROL_VAR": "c",
        "NOT_ALLOWED": "x"}})
}

#[tokio::test(flavor = "multi_thread")]
async fn users_in_different_groups_get_their_own_names_values_and_kernelspecs() {
    let eg = eg();
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "envgate.toml", HEADER_POLICY);
    let gate = Envgate::start(&eg.url, &["--config", &config]);
    let alice: &[(&str, &str)] = &[("X-Forwarded-User", "alice"), ("X-Forwarded-Groups", "data-eng")];
    let bob: &[(&str, &str)] = &[("X-Forwarded-User", "Bob.Smith@corp"), ("X-Forwarded-Groups", "analysts, other")];
    let carol: &[(&str, &str)] = &[("X-Forwarded-User", "carol")];

    // Same kernelspec, same body: each kernel gets what its user's blocks allow.
    let ra = start(&gate.addr, alice, &body("python3")).await;
    let a = started_id(&ra).await;
    let rb = start(&gate.addr, bob, &body("python3")).await;
    let b = started_id(&rb).await;
    let rc = start(&gate.addr, carol, &body("python3")).await;
    let c = started_id(&rc).await;
    let env_a = kernel_env(&gate, &a, &[]).await;
    let env_b = kernel_env(&gate, &b, &[]).await;
    let env_c = kernel_env(&gate, &c, &[]).await;
    let get = |env: &BTreeMap<String, String>, k: &str| env.get(k).cloned();

    assert_eq!(get(&env_a, "SPARK_HOME").as_deref(), Some("/opt/spark"));
    assert_eq!(get(&env_a, "EVERYONE_VAR").as_deref(), Some("e"));
    assert_eq!(get(&env_a, "KERNEL_USERNAME").as_deref(), Some("alice"));
    assert_eq!(get(&env_a, "KERNEL_NAMESPACE").as_deref(), Some("jupyter-alice"));
    assert_eq!(get(&env_a, "KERNEL_SERVICE_ACCOUNT_NAME").as_deref(), Some("spark-runner"));
    for k in ["ANALYST_VAR", "CAROL_VAR", "NOT_ALLOWED"] {
        assert!(!env_a.contains_key(k), "{k} must not reach alice's kernel");
    }

    assert_eq!(get(&env_b, "ANALYST_VAR").as_deref(), Some("a"));
    assert_eq!(get(&env_b, "KERNEL_USERNAME").as_deref(), Some("Bob.Smith@corp"));
    let ns = get(&env_b, "KERNEL_NAMESPACE").unwrap();
    assert!(ns.starts_with("jupyter-bob-smith-corp-") && ns.len() == "jupyter-bob-smith-corp-".len() + 16, "{ns}");
    for k in ["SPARK_HOME", "EVERYONE_VAR", "CAROL_VAR", "NOT_ALLOWED", "KERNEL_SERVICE_ACCOUNT_NAME"] {
        assert!(!env_b.contains_key(k), "{k} must not reach bob's kernel (analysts deny EVERYONE_VAR)");
    }

    assert_eq!(get(&env_c, "CAROL_VAR").as_deref(), Some("c"));
    assert_eq!(get(&env_c, "EVERYONE_VAR").as_deref(), Some("e"));
    for k in ["SPARK_HOME", "ANALYST_VAR", "NOT_ALLOWED"] {
        assert!(!env_c.contains_key(k), "{k} must not reach carol's kernel");
    }

    // The audit names the identity, the block that kept each name, and what envgate set.
    let rec = record_of(&gate, &ra);
    assert_eq!(rec["user"], "alice");
    assert_eq!(rec["user_source"], "trusted_header");
    assert_eq!(rec["identity_source"], "header");
    assert_eq!(rec["groups"], json!(["data-eng"]));
    assert_eq!(by_name(&rec["kept"], "source")["SPARK_HOME"], "group:data-eng");
    assert_eq!(
        by_name(&rec["set_envs"], "source"),
        pairs(&[("KERNEL_NAMESPACE", "global"), ("KERNEL_SERVICE_ACCOUNT_NAME", "group:data-eng")])
    );
    let rec = record_of(&gate, &rb);
    assert_eq!(rec["groups"], json!(["analysts", "other"]));
    assert_eq!(by_name(&rec["kept"], "source")["ANALYST_VAR"], "group:analysts");
    assert_eq!(by_name(&rec["rejected"], "reason")["EVERYONE_VAR"], "denied");
    assert_eq!(by_name(&record_of(&gate, &rc)["kept"], "source")["CAROL_VAR"], "user:carol");
    let text = gate.audit_text();
    for v in ["/opt/spark", "spark-runner", "jupyter-alice"] {
        assert!(!text.contains(v), "audit log holds a value: {v}");
    }

    // A kernelspec an identity may not start: 403, audited, and EG starts nothing.
    let before = eg_kernels(&eg).await;
    let r = start(&gate.addr, bob, &body("spark")).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("spark"), "{}", r.text());
    let rec = record_of(&gate, &r);
    assert_eq!((rec["outcome"].as_str(), rec["error"].as_str()), (Some("refused"), Some("kernelspec not allowed")));
    assert_eq!(eg_kernels(&eg).await, before, "a refused start must not start a kernel");
    let r = start(&gate.addr, alice, &body("spark")).await;
    let spark = started_id(&r).await;

    // A client value for a name envgate sets: refused (the default), and no kernel.
    let mut mine = body("python3");
    mine["env"]["KERNEL_NAMESPACE"] = json!("kube-system");
    let r = start(&gate.addr, alice, &mine).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(record_of(&gate, &r)["error"], "set_envs value differs");
    assert!(!r.text().contains("kube-system"), "the refusal echoes the value: {}", r.text());
    // The same value as envgate's is no mismatch.
    mine["env"]["KERNEL_NAMESPACE"] = json!("jupyter-alice");
    let same = started_id(&start(&gate.addr, alice, &mine).await).await;
    assert_eq!(eg_kernels(&eg).await, before + 2);

    // A start without the user header is refused; so is a body claiming another user.
    let r = start(&gate.addr, &[("X-Forwarded-Groups", "data-eng")], &body("python3")).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let mut claim = body("python3");
    claim["env"]["KERNEL_USERNAME"] = json!("root");
    let r = start(&gate.addr, alice, &claim).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(eg_kernels(&eg).await, before + 2);

    for id in [a, b, c, spark, same] {
        let r = request(&gate.addr, "DELETE", &format!("/api/kernels/{id}"), &[], b"").await.unwrap();
        assert_eq!(r.status, 204, "{}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn overwrite_puts_envgates_value_in_the_kernel() {
    let eg = eg();
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "envgate.toml", &format!("set_envs_mismatch = \"overwrite\"\n{HEADER_POLICY}"));
    let gate = Envgate::start(&eg.url, &["--config", &config]);
    let alice: &[(&str, &str)] = &[("X-Forwarded-User", "alice"), ("X-Forwarded-Groups", "data-eng")];
    let mut mine = body("python3");
    mine["env"]["KERNEL_NAMESPACE"] = json!("kube-system");
    mine["env"]["KERNEL_SERVICE_ACCOUNT_NAME"] = json!("cluster-admin");
    let r = start(&gate.addr, alice, &mine).await;
    let id = started_id(&r).await;
    let env = kernel_env(&gate, &id, &[]).await;
    assert_eq!(env.get("KERNEL_NAMESPACE").map(String::as_str), Some("jupyter-alice"));
    assert_eq!(env.get("KERNEL_SERVICE_ACCOUNT_NAME").map(String::as_str), Some("spark-runner"));
    let rec = record_of(&gate, &r);
    assert_eq!(rec["outcome"], "forwarded");
    assert_eq!(rec["set_envs"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_identity_sees_its_own_kernelspecs() {
    let eg = eg();
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "envgate.toml", HEADER_POLICY);
    let gate = Envgate::start(&eg.url, &["--config", &config]);
    let alice: &[(&str, &str)] = &[("X-Forwarded-User", "alice"), ("X-Forwarded-Groups", "data-eng")];
    let bob: &[(&str, &str)] = &[("X-Forwarded-User", "bob"), ("X-Forwarded-Groups", "analysts")];
    let carol: &[(&str, &str)] = &[("X-Forwarded-User", "carol")];
    let get = |who: &'static [(&'static str, &'static str)], path: &'static str| {
        let addr = gate.addr.clone();
        async move { request(&addr, "GET", path, who, b"").await.unwrap() }
    };
    let client_envs = |r: &Response, spec: &str| -> Vec<String> {
        let v = r.json();
        let spec = &v["kernelspecs"][spec];
        assert!(spec.is_object(), "{spec} missing: {}", r.text());
        serde_json::from_value(spec["spec"]["metadata"]["client_envs"].clone()).unwrap()
    };
    let specs = |r: &Response| -> Vec<String> {
        let mut s: Vec<String> = r.json()["kernelspecs"].as_object().unwrap().keys().cloned().collect();
        s.sort();
        s
    };

    let la = get(alice, "/api/kernelspecs").await;
    let lb = get(bob, "/api/kernelspecs").await;
    let lc = get(carol, "/api/kernelspecs").await;
    for r in [&la, &lb, &lc] {
        assert_eq!(r.status, 200, "{}", r.text());
        let vary: Vec<String> = r
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("vary"))
            .map(|(_, v)| v.to_ascii_lowercase())
            .collect();
        let vary = vary.join(", ");
        assert!(vary.contains("x-forwarded-user") && vary.contains("x-forwarded-groups"), "Vary: {vary}");
    }
    assert_eq!(specs(&la), ["python3", "spark"]);
    assert_eq!(specs(&lb), ["python3"]);
    assert_eq!(specs(&lc), ["python3", "python3_meta", "spark"]);
    assert_eq!(client_envs(&la, "python3"), ["EVERYONE_VAR"]);
    assert_eq!(client_envs(&lb, "python3"), ["ANALYST_VAR"]);
    assert_eq!(client_envs(&lc, "python3"), ["CAROL_VAR", "EVERYONE_VAR"]);
    assert_eq!(client_envs(&lc, "python3_meta"), ["CAROL_VAR", "EVERYONE_VAR", "META_VAR"]);
    let etags: Vec<&str> = [&la, &lb, &lc].iter().map(|r| r.header("etag").unwrap()).collect();
    assert!(etags[0] != etags[1] && etags[1] != etags[2] && etags[0] != etags[2], "{etags:?}");

    // One kernelspec: a hidden one is 404, as EG answers for one it does not have.
    let r = get(bob, "/api/kernelspecs/spark").await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = get(alice, "/api/kernelspecs/spark").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // The same identity twice gets the same body and ETag; a conditional request is a 304.
    let again = get(alice, "/api/kernelspecs").await;
    assert_eq!((again.header("etag"), again.text()), (la.header("etag"), la.text()));
    let etag = la.header("etag").unwrap().to_string();
    let r = request(&gate.addr, "GET", "/api/kernelspecs", &[alice[0], alice[1], ("If-None-Match", &etag)], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 304);
    let r =
        request(&gate.addr, "GET", "/api/kernelspecs", &[bob[0], bob[1], ("If-None-Match", &etag)], b"").await.unwrap();
    assert_eq!(r.status, 200, "alice's ETag must not match bob's body");
}

const ISS: &str = "https://idp.example.org/realms/jupyter";
const AUD: &str = "enterprise-gateway";

fn jwt_args(keys: &str) -> Vec<&str> {
    vec!["--jwt-keys", keys, "--jwt-issuer", ISS, "--jwt-audience", AUD, "--jwt-leeway", "5s"]
}

fn jwt_policy() -> &'static str {
    r#"
[set_envs]
KERNEL_NAMESPACE = "jupyter-{user_dns}"
[groups.data-eng]
allow_prefixes = ["SPARK_"]
"#
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_verified_on_every_request_and_bad_ones_start_nothing() {
    let eg = eg();
    let keys = Keys::generate("idp");
    let other = Keys::generate("attacker");
    let dir = tempfile::tempdir().unwrap();
    let jwks = write(dir.path(), "jwks.json", &keys.jwks());
    let config = write(dir.path(), "envgate.toml", jwt_policy());
    let mut args = jwt_args(&jwks);
    args.extend(["--config", &config]);
    let gate = Envgate::start(&eg.url, &args);

    let good = keys.sign(Kind::Ec, &jwt::claims(ISS, AUD, "alice", &["data-eng"]));
    let bearer = format!("Bearer {good}");
    // The token names alice; the header and the body claim bob: the token wins, the claim is refused.
    let auth: &[(&str, &str)] = &[("Authorization", &bearer), ("X-Forwarded-User", "bob")];
    let r = start(&gate.addr, auth, &json!({"name": "python3", "env": {"SPARK_HOME": "/opt/spark"}})).await;
    let id = started_id(&r).await;
    let rec = record_of(&gate, &r);
    assert_eq!((rec["user"].as_str(), rec["user_source"].as_str()), (Some("alice"), Some("jwt")));
    assert_eq!(rec["identity_source"], "jwt");
    assert_eq!(rec["groups"], json!(["data-eng"]));
    assert_eq!(by_name(&rec["kept"], "source")["SPARK_HOME"], "group:data-eng");

    // The kernelspec list depends on the token: a shared cache must key it by that header.
    let r = request(&gate.addr, "GET", "/api/kernelspecs", &[("Authorization", &bearer)], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let vary: Vec<String> =
        r.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("vary")).map(|(_, v)| v.to_ascii_lowercase()).collect();
    assert!(vary.iter().any(|v| v.contains("authorization")), "Vary: {vary:?}");

    // The WebSocket needs the token too.
    let url = format!("ws://{}/api/kernels/{id}/channels", gate.addr);
    let err = run_code(&url, &[], Protocol::V1, PRINT_ENV).await.unwrap_err();
    assert!(err.contains("401"), "{err}");
    let env = kernel_env(&gate, &id, &[("Authorization", &bearer)]).await;
    assert_eq!(env.get("KERNEL_USERNAME").map(String::as_str), Some("alice"));
    assert_eq!(env.get("KERNEL_NAMESPACE").map(String::as_str), Some("jupyter-alice"));
    assert_eq!(env.get("SPARK_HOME").map(String::as_str), Some("/opt/spark"));

    let r = start(&gate.addr, auth, &json!({"name": "python3", "env": {"KERNEL_USERNAME": "bob"}})).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(record_of(&gate, &r)["user"], "alice");

    // Every forgery and every wrongly addressed or timed token: 401 naming the check, audited,
    // never the token in the answer or the log, and no kernel.
    let now = jwt::now();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = jwt::claims(ISS, AUD, "alice", &["data-eng"]);
        f(&mut c);
        c
    };
    let cases: Vec<(&str, String)> = vec![
        ("expired", keys.sign(Kind::Rsa, &with(&|c| c["exp"] = json!(now - 60)))),
        ("not_yet_valid", keys.sign(Kind::Ed, &with(&|c| c["nbf"] = json!(now + 600)))),
        ("bad_signature", jwt::swap_payload(&good, &jwt::claims(ISS, AUD, "root", &["data-eng"]))),
        ("unknown_key", other.sign(Kind::Rsa, &jwt::claims(ISS, AUD, "alice", &[]))),
        ("wrong_issuer", keys.sign(Kind::Rsa, &with(&|c| c["iss"] = json!("https://evil.example.org")))),
        ("wrong_audience", keys.sign(Kind::Ec, &with(&|c| c["aud"] = json!("another-service")))),
        ("unsupported_algorithm", jwt::alg_none(&jwt::claims(ISS, AUD, "alice", &[]))),
        (
            "unsupported_algorithm",
            jwt::hmac(
                keys.rsa_public_pem().as_bytes(),
                Some(keys.kid(Kind::Rsa)),
                &jwt::claims(ISS, AUD, "alice", &[]),
            ),
        ),
        ("malformed", "not.a-token".to_string()),
    ];
    let before = eg_kernels(&eg).await;
    for (reason, token) in &cases {
        let bearer = format!("Bearer {token}");
        let r = start(&gate.addr, &[("Authorization", &bearer)], &json!({"name": "python3"})).await;
        assert_eq!(r.status, 401, "{reason}: {}", r.text());
        let v = r.json();
        assert!(v["message"].as_str().unwrap().contains(&format!("token {reason}")), "{reason}: {v}");
        assert!(v["reason"].is_string(), "{v}");
        assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"), "{reason}");
        assert!(!r.text().contains(token.as_str()), "the answer echoes the token");
        let rec = record_of(&gate, &r);
        assert_eq!(rec["outcome"], "refused");
        assert_eq!(rec["status"], 401);
        assert_eq!(rec["error"], format!("token {reason}"));
        // The other routes too (here a kernelspec list): nothing passes without a valid token.
        let r = request(&gate.addr, "GET", "/api/kernelspecs", &[("Authorization", &bearer)], b"").await.unwrap();
        assert_eq!(r.status, 401, "{reason}");
    }
    let r = start(&gate.addr, &[], &json!({"name": "python3"})).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(record_of(&gate, &r)["error"], "token missing");
    assert_eq!(eg_kernels(&eg).await, before, "a refused token must not start a kernel");
    let text = format!("{}{}", gate.audit_text(), gate.log());
    for (_, token) in &cases {
        let sig = token.rsplit('.').next().unwrap();
        assert!(sig.len() < 8 || !text.contains(sig), "a token reached the logs");
    }
    assert!(!text.contains(&good), "the good token reached the logs");

    let r =
        request(&gate.addr, "DELETE", &format!("/api/kernels/{id}"), &[("Authorization", &bearer)], b"").await.unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_applies_changed_blocks_and_rotated_keys() {
    let eg = eg();
    let old = Keys::generate("old");
    let new = Keys::generate("new");
    let dir = tempfile::tempdir().unwrap();
    let jwks = write(dir.path(), "jwks.json", &old.jwks());
    let config = write(dir.path(), "envgate.toml", jwt_policy());
    let mut args = jwt_args(&jwks);
    args.extend(["--config", &config]);
    let gate = Envgate::start(&eg.url, &args);
    let old_token = format!("Bearer {}", old.sign(Kind::Rsa, &jwt::claims(ISS, AUD, "alice", &["data-eng"])));
    let new_token = format!("Bearer {}", new.sign(Kind::Ed, &jwt::claims(ISS, AUD, "alice", &["data-eng"])));
    let body = json!({"name": "python3", "env": {"SPARK_HOME": "/opt/spark", "LAB_VAR": "l", "USER_VAR": "u"}});

    let r = start(&gate.addr, &[("Authorization", &old_token)], &body).await;
    let first = started_id(&r).await;
    let rec = record_of(&gate, &r);
    assert_eq!(by_name(&rec["kept"], "source")["SPARK_HOME"], "group:data-eng");
    assert_eq!(by_name(&rec["rejected"], "reason")["LAB_VAR"], "not_allowed");
    assert_eq!(by_name(&rec["rejected"], "reason")["USER_VAR"], "not_allowed");
    let r = start(&gate.addr, &[("Authorization", &new_token)], &body).await;
    assert_eq!(r.status, 401);
    assert_eq!(record_of(&gate, &r)["error"], "token unknown_key");

    // Rotate: only the new keys; data-eng now sends LAB_VAR instead of SPARK_*, and may start only spark;
    // alice gains a block of her own.
    write(dir.path(), "jwks.json", &new.jwks());
    write(
        dir.path(),
        "envgate.toml",
        "[groups.data-eng]\nclient_envs = [\"LAB_VAR\"]\nkernelspecs = [\"spark\"]\n\
         [users.alice]\nclient_envs = [\"USER_VAR\"]\n",
    );
    gate.signal("HUP");
    assert!(gate.wait_log("configuration reloaded"), "{}", gate.log());

    let r = start(&gate.addr, &[("Authorization", &old_token)], &body).await;
    assert_eq!(r.status, 401, "a token of a removed key must fail even when cached: {}", r.text());
    assert_eq!(record_of(&gate, &r)["error"], "token unknown_key");
    let r = start(&gate.addr, &[("Authorization", &new_token)], &body).await;
    assert_eq!(r.status, 403, "python3 is no longer allowed: {}", r.text());
    let mut spark = body.clone();
    spark["name"] = json!("spark");
    let r = start(&gate.addr, &[("Authorization", &new_token)], &spark).await;
    let second = started_id(&r).await;
    assert_eq!(by_name(&record_of(&gate, &r)["kept"], "source")["USER_VAR"], "user:alice");
    let env = kernel_env(&gate, &second, &[("Authorization", &new_token)]).await;
    assert_eq!(env.get("LAB_VAR").map(String::as_str), Some("l"));
    assert_eq!(env.get("USER_VAR").map(String::as_str), Some("u"));
    assert!(!env.contains_key("SPARK_HOME"));
    assert!(!env.contains_key("KERNEL_NAMESPACE"), "the reload removed the global set_envs");

    for id in [first, second] {
        let r = request(&gate.addr, "DELETE", &format!("/api/kernels/{id}"), &[("Authorization", &new_token)], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 204, "{}", r.text());
    }
}

/// The token is envgate's to check: it never reaches the gateway (a recording upstream stands in
/// for EG here, since EG cannot show the headers it was sent), and every refusal is counted by
/// reason on `/metrics`.
#[tokio::test(flavor = "multi_thread")]
async fn the_token_is_not_forwarded_and_refusals_are_counted() {
    use support::fake_upstream::{listen, read_request};
    use tokio::io::AsyncWriteExt;

    let (tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<String>();
    let upstream = listen(support::fake_upstream::any_port(), move |mut c| {
        let tx = tx.clone();
        async move {
            while let Some(head) = read_request(&mut c).await {
                let _ = tx.send(head.text);
                let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]";
                if c.get_mut().write_all(ok).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let keys = Keys::generate("idp");
    let dir = tempfile::tempdir().unwrap();
    let jwks = write(dir.path(), "jwks.json", &keys.jwks());
    let admin = format!("127.0.0.1:{}", support::eg::free_port());
    let mut args = jwt_args(&jwks);
    args.extend(["--admin-listen", &admin]);
    let gate = Envgate::start(&format!("http://{upstream}"), &args);

    let token = keys.sign(Kind::Rsa, &jwt::claims(ISS, AUD, "alice", &[]));
    let bearer = format!("Bearer {token}");
    let r = request(&gate.addr, "GET", "/api/kernels", &[("Authorization", &bearer)], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let head = heads.recv().await.unwrap();
    assert!(head.starts_with("GET /api/kernels "), "{head}");
    assert!(!head.to_ascii_lowercase().contains("authorization"), "the token reached the gateway: {head}");
    assert!(!head.contains(&token));

    let expired = keys.sign(Kind::Rsa, &{
        let mut c = jwt::claims(ISS, AUD, "alice", &[]);
        c["exp"] = json!(jwt::now() - 600);
        c
    });
    for t in [expired.as_str(), expired.as_str(), "x.y.z"] {
        let b = format!("Bearer {t}");
        let r = request(&gate.addr, "GET", "/api/kernels", &[("Authorization", &b)], b"").await.unwrap();
        assert_eq!(r.status, 401);
    }
    let r = request(&gate.addr, "GET", "/api/kernels", &[], b"").await.unwrap();
    assert_eq!(r.status, 401);
    assert!(heads.try_recv().is_err(), "a refused request reached the gateway");
    let m = request(&admin, "GET", "/metrics", &[], b"").await.unwrap().text();
    for (reason, n) in [("expired", 2), ("malformed", 1), ("missing", 1)] {
        let line = format!("envgate_token_refused_total{{reason=\"{reason}\"}} {n}");
        assert!(m.lines().any(|l| l == line), "no `{line}` in:\n{m}");
    }
    assert!(!m.contains("alice"), "no user label");
}
