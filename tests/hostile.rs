//! Hostile clients against envgate in front of a real EG: paths that are not byte for byte a
//! policy route but could become one, odd request framing, and body tricks. Whatever a client
//! sends, no kernel starts with a name the policy does not allow, and what EG sees is what was
//! audited.

mod support;

use std::collections::BTreeMap;

use std::time::Duration;

use serde_json::json;
use support::eg::{Eg, EgOptions};
use support::envgate::Envgate;
use support::http::{request, request_raw, Response};
use support::kernel::{run_code, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// EG that forwards every name it is sent (so only envgate decides) and lists its kernels.
fn eg(base_url: Option<&str>, token: Option<&str>) -> Eg {
    Eg::start(EgOptions {
        base_url: base_url.map(str::to_string),
        client_envs: vec!["*".into()],
        auth_token: token.map(str::to_string),
        extra_env: vec![("EG_LIST_KERNELS".into(), "True".into())],
        ..EgOptions::default()
    })
}

/// The body every variant sends: one allowed and one disallowed name.
fn body() -> Vec<u8> {
    serde_json::to_vec(&json!({"name": "python3", "env": {"ALLOWED": "a", "NOT_ALLOWED": "x"}})).unwrap()
}

async fn kernels(eg: &Eg) -> Vec<String> {
    let auth = eg.auth_headers();
    let headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = request(&eg.addr, "GET", &format!("{}/api/kernels", eg.base_url), &headers, b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().as_array().unwrap().iter().map(|k| k["id"].as_str().unwrap().to_string()).collect()
}

async fn kernel_env(addr: &str, base: &str, id: &str) -> BTreeMap<String, String> {
    let url = format!("ws://{addr}{base}/api/kernels/{id}/channels");
    let out = run_code(&url, &[], Protocol::V1, "import os, json; print(json.dumps(dict(os.environ)))")
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("kernel printed no JSON ({e}): {out}"))
}

/// Every path variant of the facts file (and more) that a server or proxy in the chain could
/// normalize into `{base}/api/kernels` or `{base}/api/sessions`.
fn variants(base: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        "/api/kernels/",
        "/api//kernels",
        "//api/kernels",
        "/api/%6Bernels",
        "/api/%256Bernels",
        "/%61pi/kernels",
        "/API/kernels",
        "/api/Kernels",
        "/api/./kernels",
        "/api/x/../kernels",
        "/api/kernels;x",
        "/api;x/kernels",
        "/api%2Fkernels",
        "/api%2fkernels",
        "/api/kernels%2F",
        "/api/kernels%00",
        "/api/kernels/.",
        "/api/kernels//",
        "/api/sessions/",
        "/api/%73essions",
        "/API/sessions",
        "/api/./sessions",
    ]
    .iter()
    .map(|p| format!("{base}{p}"))
    .collect();
    if !base.is_empty() {
        // the base itself spelled another way
        let b = base.trim_start_matches('/');
        v.push(format!("/{}/api/kernels", b.to_uppercase()));
        v.push(format!("//{b}/api/kernels"));
        v.push(format!("/{b}/./api/kernels"));
        v.push(format!("/x/../{b}/api/kernels"));
        v.push("/api/kernels".to_string());
    }
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn no_path_variant_reaches_a_kernel_start_unfiltered() {
    for base in [None, Some("/gw")] {
        let eg = eg(base, None);
        let b = eg.base_url.clone();
        let gate = Envgate::start(&eg.url, &["--client-envs", "ALLOWED"]);
        let before = kernels(&eg).await;
        let variants = variants(&b);
        for path in &variants {
            let r = request(&gate.addr, "POST", path, &[("Content-Type", "application/json")], &body()).await.unwrap();
            assert_eq!(r.status, 400, "{path} under {b:?}: {}", r.text());
            assert_eq!(r.json()["reason"], "Bad Request", "{path}");
        }
        // The absolute form, which another proxy could turn into the origin form.
        for target in [format!("http://{}{b}/api/kernels", eg.addr), format!("http://{}{b}/api/sessions", eg.addr)] {
            let raw = format!(
                "POST {target} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n",
                gate.addr,
                body().len()
            );
            let mut raw = raw.into_bytes();
            raw.extend_from_slice(&body());
            let r = request_raw(&gate.addr, &raw, false).await.unwrap();
            assert_eq!(r.status, 400, "{target}: {}", r.text());
        }
        assert_eq!(kernels(&eg).await, before, "no variant started a kernel under {b:?}");
        let recs = gate.audit(variants.len() + 2);
        assert!(recs.iter().all(|r| r["outcome"] == "refused" && r["status"] == 400), "under {b:?}: {recs:?}");

        // The exact route, with a query string (which tornado ignores), is the policy route.
        let r = request(&gate.addr, "POST", &format!("{b}/api/kernels?x=1"), &[], &body()).await.unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_string();
        let env = kernel_env(&gate.addr, &b, &id).await;
        assert_eq!(env.get("ALLOWED").map(String::as_str), Some("a"));
        assert!(!env.contains_key("NOT_ALLOWED"), "under {b:?}");
        let r = request(&gate.addr, "DELETE", &format!("{b}/api/kernels/{id}"), &[], b"").await.unwrap();
        assert_eq!(r.status, 204);
    }
}

/// `body` in the chunked transfer coding, `size` bytes a chunk.
fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A raw request to envgate, with a body.
async fn raw(addr: &str, head: &str, body: &[u8]) -> Response {
    let mut bytes = head.replace('\n', "\r\n").into_bytes();
    bytes.extend_from_slice(body);
    request_raw(addr, &bytes, false).await.unwrap()
}

/// Writes `bytes` on a new connection and reads until envgate closes it (or resets it: the bytes
/// it never read may do that), failing after 20 s.
async fn until_closed(addr: &str, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("envgate closed the connection");
    String::from_utf8_lossy(&answer).into_owned()
}

/// The JSON body of the one response in `answer` (which has `Content-Length`).
fn json_of(answer: &str) -> serde_json::Value {
    let (_, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head end: {answer}"));
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not one JSON body ({e}): {answer}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn request_framing_is_strict_and_correct() {
    let eg = eg(None, None);
    let gate = Envgate::start(&eg.url, &["--client-envs", "ALLOWED", "--max-body-bytes", "4096"]);
    let a = gate.addr.clone();
    let b = body();
    let n = b.len();
    let before = kernels(&eg).await;

    // Content-Length with Transfer-Encoding: envgate's own 400, and the connection closed after
    // it, so a request smuggled behind the body is never read (more in
    // `length_and_chunks_together_are_refused_wherever_they_are`).
    let smuggled = String::from_utf8(body()).unwrap();
    let both = format!(
        "POST /api/kernels HTTP/1.1\nHost: {a}\nContent-Length: 60\nTransfer-Encoding: chunked\n\n0\n\n\
         POST /api/kernels HTTP/1.1\nHost: {a}\nContent-Length: {}\n\n{smuggled}",
        smuggled.len()
    );
    let answer = until_closed(&a, both.replace('\n', "\r\n").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "CL + TE: {answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "one answer, then the connection closed: {answer}");
    assert_eq!(
        json_of(&answer)["message"],
        "envgate refuses a request with both Content-Length and Transfer-Encoding: its length is ambiguous"
    );
    let dup = format!(
        "POST /api/kernels HTTP/1.1\nHost: {a}\nContent-Length: {n}\nContent-Length: {}\nConnection: close\n\n",
        n + 1
    );
    assert_eq!(raw(&a, &dup, &b).await.status, 400, "differing Content-Length");
    let bad =
        format!("POST /api/kernels HTTP/1.1\nHost: {a}\nX-Bad: a\x01b\nContent-Length: {n}\nConnection: close\n\n");
    assert_eq!(raw(&a, &bad, &b).await.status, 400, "invalid header bytes");
    let bad_name =
        format!("POST /api/kernels HTTP/1.1\nHost: {a}\nX Bad: 1\nContent-Length: {n}\nConnection: close\n\n");
    assert_eq!(raw(&a, &bad_name, &b).await.status, 400, "invalid header name");
    assert_eq!(kernels(&eg).await, before);

    // Too large: 413 before anything reaches the upstream, by Content-Length and by chunks.
    let big = serde_json::to_vec(&json!({"name": "python3", "env": {"ALLOWED": "a".repeat(5000)}})).unwrap();
    let r = request(&a, "POST", "/api/kernels", &[], &big).await.unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    let big_chunked = chunked(&big, 1000);
    let r = request(&a, "POST", "/api/kernels", &[("Transfer-Encoding", "chunked")], &big_chunked).await.unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(kernels(&eg).await, before, "nothing reached EG");
    assert!(!eg.log().contains("POST /api/kernels"), "EG saw a kernel start:\n{}", eg.log());

    // Chunked, Expect: 100-continue and HTTP/1.0 bodies work, and are filtered.
    let mut ids = Vec::new();
    let small_chunked = chunked(&b, 7);
    let r = request(&a, "POST", "/api/kernels", &[("Transfer-Encoding", "chunked")], &small_chunked).await.unwrap();
    assert_eq!(r.status, 201, "chunked: {}", r.text());
    ids.push(r.json()["id"].as_str().unwrap().to_string());

    // Expect: 100-continue: envgate says 100 once it wants the body, then answers.
    let mut s = tokio::net::TcpStream::connect(&a).await.unwrap();
    let head = format!(
        "POST /api/kernels HTTP/1.1\r\nHost: {a}\r\nContent-Length: {n}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256];
    let k = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await.unwrap().unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..k]).starts_with("HTTP/1.1 100 Continue"),
        "{:?}",
        String::from_utf8_lossy(&buf[..k])
    );
    s.write_all(&b).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    let id = text.split("\"id\": \"").nth(1).or_else(|| text.split("\"id\":\"").nth(1)).unwrap();
    ids.push(id[..36].to_string());

    let r10 = raw(&a, &format!("POST /api/kernels HTTP/1.0\nHost: {a}\nContent-Length: {n}\n\n"), &b).await;
    assert_eq!(r10.status, 201, "HTTP/1.0: {}", r10.text());
    ids.push(r10.json()["id"].as_str().unwrap().to_string());

    for id in &ids {
        let env = kernel_env(&a, "", id).await;
        assert_eq!(env.get("ALLOWED").map(String::as_str), Some("a"), "{id}");
        assert!(!env.contains_key("NOT_ALLOWED"), "{id}");
        request(&a, "DELETE", &format!("/api/kernels/{id}"), &[], b"").await.unwrap();
    }
}

/// For requests to envgate at `addr`: the length of [`body`], the body in chunks, and a kernel
/// start of it to smuggle behind a body (never to be answered).
fn smuggling(addr: &str) -> (usize, String, String) {
    let b = String::from_utf8(body()).unwrap();
    let hidden = format!("POST /api/kernels HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{b}", b.len());
    (b.len(), String::from_utf8(chunked(b.as_bytes(), 16)).unwrap(), hidden)
}

/// Framing that a front proxy could read differently from envgate, on any route: refused with
/// envgate's JSON error, the connection closed after it, nothing behind it read, nothing sent to
/// EG, and on the policy routes audited.
#[tokio::test(flavor = "multi_thread")]
async fn framing_a_front_proxy_could_read_differently_is_refused() {
    let eg = eg(None, None);
    let gate = Envgate::start(&eg.url, &["--client-envs", "ALLOWED"]);
    let a = gate.addr.clone();
    let before = kernels(&eg).await;
    let (_, chunks, hidden) = smuggling(&a);
    let start = |headers: &str| format!("POST /api/kernels HTTP/1.1\r\nHost: {a}\r\n{headers}\r\n{chunks}{hidden}");

    let cases = [
        ("gzip, chunked", "Transfer-Encoding: gzip, chunked\r\n".to_string(), 501),
        ("chunked, chunked", "Transfer-Encoding: chunked, chunked\r\n".to_string(), 501),
        ("two TE lines", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n".to_string(), 501),
        ("gzip line, chunked line", "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n".to_string(), 501),
    ];
    for (what, headers, status) in &cases {
        let answer = until_closed(&a, start(headers).as_bytes()).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{what}: {answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{what}: one answer, then closed: {answer}");
        assert!(answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{what}: {answer}");
        let v = json_of(&answer);
        assert_eq!(v["reason"], "Not Implemented", "{what}");
        assert!(v["message"].as_str().unwrap().contains("Transfer-Encoding"), "{what}: {v}");
        assert!(!v["message"].as_str().unwrap().contains("gzip"), "{what}: no header value in the message: {v}");
    }

    // Behind a request on a kept-alive connection, and pipelined right after one: the same.
    let mut s = tokio::net::TcpStream::connect(&a).await.unwrap();
    let first_req = format!("GET /api/kernelspecs HTTP/1.1\r\nHost: {a}\r\n\r\n");
    let first = support::http::request_raw_on(&mut s, first_req.as_bytes(), false).await.unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    s.write_all(start(&cases[0].1).as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await.expect("closed");
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 501 "), "after a kept-alive request: {rest}");
    assert_eq!(rest.matches("HTTP/1.1 ").count(), 1, "{rest}");
    let answer = until_closed(&a, format!("{first_req}{}", start(&cases[1].1)).as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "pipelined: {answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 2, "pipelined: two answers, then closed: {answer}");
    assert!(answer.contains("HTTP/1.1 501 "), "pipelined: {answer}");

    // Codings hyper refuses itself (its own empty 400, before envgate sees the request).
    for (what, te) in [("identity", "identity"), ("chunked, gzip", "chunked, gzip"), ("empty", "")] {
        let answer = until_closed(&a, start(&format!("Transfer-Encoding: {te}\r\n")).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{what}: {answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{what}: {answer}");
    }
    let folded =
        format!("POST /api/kernels HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: gzip,\r\n chunked\r\n\r\n{chunks}");
    let answer = until_closed(&a, folded.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "obs-fold: {answer}");

    // A session start and an ambiguous kernel-start path: refused the same way.
    for path in ["/api/sessions", "/api/kernels/"] {
        let req = format!("POST {path} HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{chunks}");
        let answer = until_closed(&a, req.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 501 "), "{path}: {answer}");
    }
    assert_eq!(kernels(&eg).await, before, "no kernel started");

    // Audited on the policy routes: refused, with the status and the problem, never a value.
    let recs = gate.audit(cases.len() + 4);
    let framing: Vec<&serde_json::Value> =
        recs.iter().filter(|r| r["error"].as_str().is_some_and(|e| e.contains("transfer-encoding"))).collect();
    assert_eq!(framing.len(), cases.len() + 4, "{recs:?}");
    for r in &framing {
        assert_eq!(r["outcome"], "refused", "{r}");
        assert_eq!(r["status"], 501, "{r}");
        assert_eq!(r["error"], "transfer-encoding other than chunked", "{r}");
    }
    assert!(framing.iter().any(|r| r["event"] == "session_start"), "{framing:?}");
    assert!(!gate.audit_text().contains("gzip"), "no header value in the audit log");

    // chunked alone still starts a kernel.
    let r = request(&a, "POST", "/api/kernels", &[("Transfer-Encoding", "chunked")], chunks.as_bytes()).await.unwrap();
    assert_eq!(r.status, 201, "chunked: {}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    request(&a, "DELETE", &format!("/api/kernels/{id}"), &[], b"").await.unwrap();
}

/// EG's log once it holds a request sent through envgate now: had EG seen any request sent
/// before it, the log would show that one too.
async fn eg_log_after_a_probe(envgate: &str, eg: &Eg) -> String {
    let r = request(envgate, "GET", "/api/framing-probe-seen", &[], b"").await.unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !eg.log().contains("framing-probe-seen") {
        assert!(std::time::Instant::now() < deadline, "EG never logged a request:\n{}", eg.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eg.log()
}

/// A pass-through route is refused the same way, and nothing of it reaches EG: not the request,
/// not what is smuggled behind it.
#[tokio::test(flavor = "multi_thread")]
async fn framing_a_front_proxy_could_read_differently_never_reaches_eg_on_pass_through() {
    let eg = eg(None, None);
    let admin = format!("127.0.0.1:{}", support::eg::free_port());
    let gate = Envgate::start(&eg.url, &["--admin-listen", &admin]);
    let a = gate.addr.clone();
    let hidden = format!("GET /api/framing-probe-hidden HTTP/1.1\r\nHost: {a}\r\n\r\n");
    for te in ["gzip, chunked", "chunked, chunked"] {
        let req = format!(
            "GET /api/framing-probe-refused HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\n{hidden}"
        );
        let answer = until_closed(&a, req.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 501 "), "{te}: {answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{te}: {answer}");
        assert!(json_of(&answer)["message"].as_str().unwrap().contains("Transfer-Encoding"), "{answer}");
    }
    let log = eg_log_after_a_probe(&a, &eg).await;
    assert!(!log.contains("framing-probe-refused") && !log.contains("framing-probe-hidden"), "EG saw:\n{log}");
    assert!(gate.audit_text().is_empty(), "a pass-through route writes no audit record");
    let metrics = request(&admin, "GET", "/metrics", &[], b"").await.unwrap().text();
    for want in [
        "envgate_framing_refused_total{kind=\"transfer_encoding\"} 2",
        "envgate_requests_total{route=\"other\",status=\"501\"} 2",
    ] {
        assert!(metrics.contains(want), "{want}:\n{metrics}");
    }
}

/// Header text a body may hold: read as a head, it would be one with both framings.
const FAKE_HEAD: &str = "\r\n\r\nPOST /api/kernels HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n";

/// Both `Content-Length` and `Transfer-Encoding`, in either order, in any case, with the length
/// given twice: envgate's JSON 400 with `Connection: close`, first on a connection, after a
/// kept-alive request and pipelined behind one; audited on the policy routes; nothing smuggled
/// behind it is read. A body that merely holds such header text is a body.
#[tokio::test(flavor = "multi_thread")]
async fn length_and_chunks_together_are_refused_wherever_they_are() {
    let eg = eg(None, None);
    let gate = Envgate::start(&eg.url, &["--client-envs", "ALLOWED"]);
    let a = gate.addr.clone();
    let before = kernels(&eg).await;
    let (n, chunks, hidden) = smuggling(&a);
    let on = |path: &str, headers: &str| format!("POST {path} HTTP/1.1\r\nHost: {a}\r\n{headers}\r\n{chunks}{hidden}");
    let cases = [
        ("length first", format!("Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n")),
        ("chunks first", format!("Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n")),
        ("mixed case", format!("tRANSFER-eNCODING: Chunked\r\ncontent-LENGTH: {n}\r\n")),
        ("length twice", format!("Content-Length: {n}\r\nTransfer-Encoding: chunked\r\nContent-Length: {n}\r\n")),
        ("length zero", "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n".to_string()),
    ];
    let refused = |what: &str, answer: &str| {
        assert!(answer.starts_with("HTTP/1.1 400 "), "{what}: {answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{what}: one answer, then closed: {answer}");
        assert!(answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{what}: {answer}");
        let v = json_of(answer);
        assert_eq!(v["reason"], "Bad Request", "{what}");
        let m = v["message"].as_str().unwrap();
        assert!(m.contains("Content-Length") && m.contains("Transfer-Encoding"), "{what}: {v}");
    };
    let mut audited = 0;
    for (what, headers) in &cases {
        refused(what, &until_closed(&a, on("/api/kernels", headers).as_bytes()).await);
        let lf = on("/api/kernels", headers).replace("\r\n", "\n");
        refused(&format!("{what}, LF line ends"), &until_closed(&a, lf.as_bytes()).await);
        audited += 2;
    }
    // Behind a request on a kept-alive connection, and pipelined right after one.
    let first_req = format!("GET /api/kernelspecs HTTP/1.1\r\nHost: {a}\r\n\r\n");
    for (what, headers) in &cases[..2] {
        let mut s = tokio::net::TcpStream::connect(&a).await.unwrap();
        let first = support::http::request_raw_on(&mut s, first_req.as_bytes(), false).await.unwrap();
        assert_eq!(first.status, 200, "{}", first.text());
        s.write_all(on("/api/kernels", headers).as_bytes()).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await.expect("closed");
        refused(&format!("{what}, after a kept-alive request"), &String::from_utf8_lossy(&rest));
        let answer = until_closed(&a, format!("{first_req}{}", on("/api/kernels", headers)).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{what}, pipelined: {answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 2, "{what}, pipelined: two answers, then closed: {answer}");
        refused(&format!("{what}, pipelined"), &answer[answer.rfind("HTTP/1.1 ").unwrap()..]);
        audited += 2;
    }
    // A session start and an ambiguous kernel-start path: the same.
    for path in ["/api/sessions", "/api/kernels/"] {
        refused(path, &until_closed(&a, on(path, &cases[1].1).as_bytes()).await);
        audited += 1;
    }
    // A Transfer-Encoding folded over two lines: the HTTP parser's own 400 (it takes no folded
    // request header), before envgate sees the request.
    let folded = on("/api/kernels", &format!("Content-Length: {n}\r\nTransfer-Encoding:\r\n chunked\r\n"));
    let answer = until_closed(&a, folded.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "obs-fold: {answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "obs-fold: {answer}");
    assert_eq!(kernels(&eg).await, before, "no kernel started");

    // Audited as refused, with the problem and never a value.
    let recs = gate.audit(audited);
    let both: Vec<&serde_json::Value> =
        recs.iter().filter(|r| r["error"] == "both content-length and transfer-encoding").collect();
    assert_eq!(both.len(), audited, "{recs:?}");
    assert!(both.iter().all(|r| r["outcome"] == "refused" && r["status"] == 400), "{both:?}");
    assert!(both.iter().any(|r| r["event"] == "session_start"), "{both:?}");

    // Header text inside bodies is not a head: behind a body of known length that ends in it, on
    // the same connection and pipelined, and in a chunked body's data and trailers, a chunked
    // kernel start is accepted.
    let probe = format!("{FAKE_HEAD}{FAKE_HEAD}");
    let by_length =
        format!("POST /api/framing-probe-body HTTP/1.1\r\nHost: {a}\r\nContent-Length: {}\r\n\r\n{probe}", probe.len());
    let by_chunks = format!(
        "POST /api/framing-probe-body HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{probe}\r\n0\r\n\r\n",
        probe.len()
    );
    let trailers = format!(
        "POST /api/kernels HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n{}X-Trailer: 1\r\nContent-Length: 5\r\n\r\n",
        chunks.strip_suffix("\r\n").unwrap()
    );
    let start = format!("POST /api/kernels HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}");
    let mut ids = Vec::new();
    for (what, before_start) in [("length", &by_length), ("chunks", &by_chunks), ("trailers", &trailers)] {
        let mut s = tokio::net::TcpStream::connect(&a).await.unwrap();
        let first = support::http::request_raw_on(&mut s, before_start.as_bytes(), false).await.unwrap();
        assert_ne!(first.status, 400, "{what}: {}", first.text());
        let r = support::http::request_raw_on(&mut s, start.as_bytes(), false).await.unwrap();
        assert_eq!(r.status, 201, "{what}, kept alive: {}", r.text());
        ids.push(r.json()["id"].as_str().unwrap().to_string());
        let close = start.replacen("\r\n\r\n", "\r\nConnection: close\r\n\r\n", 1);
        let answer = until_closed(&a, format!("{before_start}{close}").as_bytes()).await;
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 2, "{what}, pipelined: {answer}");
        assert!(
            answer[answer.rfind("HTTP/1.1 ").unwrap()..].starts_with("HTTP/1.1 201 "),
            "{what}, pipelined: {answer}"
        );
        let id = answer.rsplit("\"id\"").next().unwrap();
        ids.push(id[id.find('"').unwrap() + 1..][..36].to_string());
    }
    for id in &ids {
        let r = request(&a, "DELETE", &format!("/api/kernels/{id}"), &[], b"").await.unwrap();
        assert_eq!(r.status, 204, "{id}: {}", r.text());
    }
}

/// On a pass-through route too: refused, counted, and neither the request nor what is smuggled
/// behind it reaches EG.
#[tokio::test(flavor = "multi_thread")]
async fn length_and_chunks_together_never_reach_eg_on_pass_through() {
    let eg = eg(None, None);
    let admin = format!("127.0.0.1:{}", support::eg::free_port());
    let gate = Envgate::start(&eg.url, &["--admin-listen", &admin]);
    let a = gate.addr.clone();
    let hidden = format!("GET /api/framing-probe-hidden HTTP/1.1\r\nHost: {a}\r\n\r\n");
    let refused = |headers: &str| {
        format!("GET /api/framing-probe-refused HTTP/1.1\r\nHost: {a}\r\n{headers}\r\n0\r\n\r\n{hidden}")
    };
    for headers in
        ["Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", "transfer-encoding: CHUNKED\r\ncontent-length: 5\r\n"]
    {
        let answer = until_closed(&a, refused(headers).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{headers:?}: {answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{headers:?}: {answer}");
        assert!(json_of(&answer)["message"].as_str().unwrap().contains("Content-Length"), "{answer}");
    }
    // After a kept-alive pass-through request whose body holds the same header text.
    let mut s = tokio::net::TcpStream::connect(&a).await.unwrap();
    let first = format!(
        "POST /api/framing-probe-first HTTP/1.1\r\nHost: {a}\r\nContent-Length: {}\r\n\r\n{FAKE_HEAD}",
        FAKE_HEAD.len()
    );
    let r = support::http::request_raw_on(&mut s, first.as_bytes(), false).await.unwrap();
    assert_ne!(r.status, 400, "{}", r.text());
    s.write_all(refused("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n").as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await.expect("closed");
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 400 "), "after a kept-alive request: {rest}");
    assert_eq!(rest.matches("HTTP/1.1 ").count(), 1, "{rest}");

    let log = eg_log_after_a_probe(&a, &eg).await;
    assert!(log.contains("framing-probe-first"), "EG saw the kept-alive request:\n{log}");
    assert!(!log.contains("framing-probe-refused") && !log.contains("framing-probe-hidden"), "EG saw:\n{log}");
    let metrics = request(&admin, "GET", "/metrics", &[], b"").await.unwrap().text();
    for want in [
        "envgate_framing_refused_total{kind=\"content_length_and_transfer_encoding\"} 3",
        "envgate_requests_total{route=\"other\",status=\"400\"} 3",
    ] {
        assert!(metrics.contains(want), "{want}:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn body_tricks_are_refused_or_normalized_and_eg_sees_what_was_audited() {
    let eg = eg(None, None);
    let gate = Envgate::start(&eg.url, &["--client-envs", "ALLOWED,FOO"]);
    let a = gate.addr.clone();
    let before = kernels(&eg).await;
    for (what, bytes) in [
        ("duplicate env", br#"{"name":"python3","env":{"ALLOWED":"a"},"env":{"NOT_ALLOWED":"x"}}"#.to_vec()),
        ("duplicate env, escaped", br#"{"name":"python3","env":{},"\u0065nv":{"NOT_ALLOWED":"x"}}"#.to_vec()),
        ("duplicate name in env", br#"{"name":"python3","env":{"FOO":"1","\u0046OO":"2"}}"#.to_vec()),
        ("byte-order mark", b"\xef\xbb\xbf{\"name\":\"python3\",\"env\":{}}".to_vec()),
        ("vertical tab", b"\x0b{\"name\":\"python3\",\"env\":{}}".to_vec()),
        ("lone surrogate", br#"{"name":"python3","env":{"FOO":"\ud800"}}"#.to_vec()),
        (
            "deep nesting",
            format!("{{\"name\":\"python3\",\"env\":{{}},\"x\":{}{}}}", "[".repeat(200), "]".repeat(200)).into_bytes(),
        ),
        ("huge number", br#"{"name":"python3","env":{},"x":1e999999}"#.to_vec()),
        ("NaN", br#"{"name":"python3","env":{},"x":NaN}"#.to_vec()),
        ("env a string", br#"{"name":"python3","env":"NOT_ALLOWED=x"}"#.to_vec()),
        ("env null", br#"{"name":"python3","env":null}"#.to_vec()),
        ("number value", br#"{"name":"python3","env":{"FOO":1}}"#.to_vec()),
        ("form body", b"name=python3&env=x".to_vec()),
        ("empty", b"".to_vec()),
        ("trailing data", br#"{"name":"python3","env":{}} {"env":{"NOT_ALLOWED":"x"}}"#.to_vec()),
    ] {
        let r = request(&a, "POST", "/api/kernels", &[("Content-Type", "application/json")], &bytes).await.unwrap();
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert!(r.json()["message"].is_string(), "{what}");
    }
    assert_eq!(kernels(&eg).await, before, "no trick started a kernel");

    // Normalized: an escaped name is the name it spells; the kernel sees exactly the audited names.
    let tricky =
        br#"{"name":"python3","env":{"\u0046OO":"f","KERNEL_\u0058":"k","NOT_\u0041LLOWED":"x","P\u0041TH":"/evil"}}"#;
    let r = request(&a, "POST", "/api/kernels", &[("Content-Type", "text/plain")], tricky).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let env = kernel_env(&a, "", &id).await;
    let rec = gate.audit(1).into_iter().find(|r| r["kernel_id"] == id.as_str()).expect("audit record");
    let kept: Vec<&str> = rec["kept"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    let rejected: Vec<&str> = rec["rejected"].as_array().unwrap().iter().map(|k| k["name"].as_str().unwrap()).collect();
    assert_eq!(kept, ["FOO", "KERNEL_X"]);
    assert_eq!(rejected, ["NOT_ALLOWED", "PATH"]);
    assert_eq!(env.get("FOO").map(String::as_str), Some("f"));
    assert_eq!(env.get("KERNEL_X").map(String::as_str), Some("k"));
    assert!(!env.contains_key("NOT_ALLOWED"));
    assert_ne!(env.get("PATH").map(String::as_str), Some("/evil"));
    request(&a, "DELETE", &format!("/api/kernels/{id}"), &[], b"").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_smuggled_in_a_form_encoded_body_does_not_authenticate() {
    let token = "smuggled-token-1234";
    let eg = eg(None, Some(token));
    let gate = Envgate::start(&eg.url, &["--client-envs", "ALLOWED"]);
    let body = format!(r#"{{"name":"python3","env":{{"ALLOWED":"&token={token}&"}}}}"#);
    let form = [("Content-Type", "application/x-www-form-urlencoded")];

    // Straight to EG, tornado reads the form field and the request is authenticated.
    let direct = request(&eg.addr, "POST", "/api/kernels", &form, body.as_bytes()).await.unwrap();
    assert_eq!(direct.status, 201, "EG takes a token from a form body: {}", direct.text());
    let id = direct.json()["id"].as_str().unwrap().to_string();
    let auth = format!("token {token}");
    request(&eg.addr, "DELETE", &format!("/api/kernels/{id}"), &[("Authorization", &auth)], b"").await.unwrap();

    // Through envgate, the body goes on as application/json: the smuggled token is just a value.
    let r = request(&gate.addr, "POST", "/api/kernels", &form, body.as_bytes()).await.unwrap();
    assert!(r.status == 401 || r.status == 403, "{} {}", r.status, r.text());
    // With a real credential it works, and the value reaches the kernel as a plain value.
    let r = request(&gate.addr, "POST", "/api/kernels", &[form[0], ("Authorization", &auth)], body.as_bytes())
        .await
        .unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    request(&gate.addr, "DELETE", &format!("/api/kernels/{id}"), &[("Authorization", &auth)], b"").await.unwrap();
}
