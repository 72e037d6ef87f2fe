//! A fast fake Enterprise Gateway for the benchmark (never for correctness: that is tested against
//! the real EG). It serves:
//!
//! - `GET /api/kernelspecs` and `GET /api/kernelspecs/python3`: the real EG 3.3.0 sample bodies;
//! - `POST /api/kernels`: 201, `Location: /api/kernels/<id>`, a body that echoes the `env` it received;
//! - `GET /api/kernels/<id>/channels` with a WebSocket upgrade: an echo of every message;
//! - anything else: 404.
//!
//! Usage: `fake-eg --listen 127.0.0.1:PORT --samples DIR [--threads N]`

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

struct Eg {
    list: Bytes,
    one: Bytes,
    next_id: AtomicU64,
}

fn main() {
    let mut listen = "127.0.0.1:8888".to_string();
    let mut samples = "/work/shared/samples".to_string();
    let mut threads = 2usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| die(&format!("{a} needs a value")));
        match a.as_str() {
            "--listen" => listen = val(),
            "--samples" => samples = val(),
            "--threads" => threads = val().parse().unwrap_or_else(|_| die("bad --threads")),
            _ => die(&format!("unknown argument {a}")),
        }
    }
    let read = |f: &str| -> Bytes {
        let p = format!("{samples}/{f}");
        let b = std::fs::read(&p).unwrap_or_else(|e| die(&format!("cannot read {p}: {e}")));
        // The samples are what EG sent; a trailing newline from an editor is not.
        let n = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(0, |i| i + 1);
        Bytes::copy_from_slice(&b[..n])
    };
    let eg = Arc::new(Eg {
        list: read("kernelspecs.json"),
        one: read("kernelspec_python3.json"),
        next_id: AtomicU64::new(1),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let l = TcpListener::bind(&listen)
            .await
            .unwrap_or_else(|e| die(&format!("cannot listen on {listen}: {e}")));
        println!("fake-eg listening on {}", l.local_addr().unwrap());
        loop {
            let Ok((s, _)) = l.accept().await else { continue };
            let _ = s.set_nodelay(true);
            let eg = eg.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| serve(req, eg.clone()));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
}

fn die(msg: &str) -> ! {
    eprintln!("fake-eg: {msg}");
    std::process::exit(2)
}

fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(header::SERVER, HeaderValue::from_static("TornadoServer/6.6.1"));
    r
}

fn etagged(body: &Bytes) -> Response<Full<Bytes>> {
    let mut r = json(StatusCode::OK, body.clone());
    r.headers_mut().insert(
        header::ETAG,
        HeaderValue::from_static("\"82c8c07462a54bc0152f375daab308ea5cacc0d2\""),
    );
    r
}

async fn serve(mut req: Request<Incoming>, eg: Arc<Eg>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    let resp = match (req.method(), path) {
        (&Method::GET, "/api/kernelspecs") => etagged(&eg.list),
        (&Method::GET, "/api/kernelspecs/python3") => etagged(&eg.one),
        (&Method::POST, "/api/kernels") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return Ok(json(StatusCode::BAD_REQUEST, Bytes::new())),
            };
            let v: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(_) => return Ok(json(StatusCode::BAD_REQUEST, Bytes::from_static(b"{\"reason\":\"Bad Request\",\"message\":\"not JSON\"}"))),
            };
            let n = eg.next_id.fetch_add(1, Ordering::Relaxed);
            let id = format!("00000000-0000-4000-8000-{n:012x}");
            let out = serde_json::json!({
                "id": id,
                "name": v.get("name").cloned().unwrap_or(serde_json::Value::Null),
                "last_activity": "2026-11-25T13:05:40.968000Z",
                "execution_state": "starting",
                "connections": 0,
                "env": v.get("env").cloned().unwrap_or(serde_json::Value::Null),
            });
            let mut r = json(StatusCode::CREATED, Bytes::from(serde_json::to_vec(&out).unwrap()));
            r.headers_mut().insert(
                header::LOCATION,
                HeaderValue::from_str(&format!("/api/kernels/{id}")).unwrap(),
            );
            r
        }
        (&Method::GET, p) if p.starts_with("/api/kernels/") && p.ends_with("/channels") => {
            let key = req.headers().get("sec-websocket-key").cloned();
            let is_ws = req
                .headers()
                .get(header::UPGRADE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
            let Some(key) = key.filter(|_| is_ws) else {
                return Ok(json(StatusCode::BAD_REQUEST, Bytes::from_static(b"{\"reason\":\"Bad Request\",\"message\":\"WebSocket only\"}")));
            };
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on.await else { return };
                let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(up), Role::Server, None).await;
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() {
                        let _ = ws.close(None).await;
                        break;
                    }
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = r.headers_mut();
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(
                "sec-websocket-accept",
                HeaderValue::from_str(&derive_accept_key(key.as_bytes())).unwrap(),
            );
            r
        }
        _ => json(StatusCode::NOT_FOUND, Bytes::from_static(b"{\"reason\":\"Not Found\",\"message\":\"Not Found\"}")),
    };
    Ok(resp)
}
