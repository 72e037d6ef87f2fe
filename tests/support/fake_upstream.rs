//! Upstreams written for the tests, for what a real EG cannot show: raw TCP ones that see every
//! byte envgate sends and can misbehave in any way (a fault per request, connection counting, an
//! upgrade echoed byte for byte, silence), and a fast fake EG (hyper) that a test can kill and
//! bring back on the same port.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What EG answers on `GET /api/kernelspecs`; envgate needs it before any kernel start.
pub const SPECS: &str = r#"{"default":"python3","kernelspecs":{"python3":{"name":"python3","spec":{"argv":[],"env":{},"display_name":"P","language":"python","metadata":{}},"resources":{}}}}"#;

/// A 200 with a small JSON body, on one connection that stays open.
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";

/// A raw connection to or from envgate.
pub type Conn = BufReader<TcpStream>;

/// Binds `addr`. A port just freed (by [`FakeEg::kill`]) may need a moment before it binds again.
async fn bind(addr: SocketAddr) -> TcpListener {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("cannot bind a fake upstream on {addr}: {e}"),
        }
    }
}

/// A raw TCP upstream on `addr`: each connection envgate opens is served by `serve`, in its own
/// task, for as long as the test runs. Returns the address it listens on.
pub async fn listen<F, Fut>(addr: SocketAddr, serve: F) -> SocketAddr
where
    F: Fn(Conn) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = bind(addr).await;
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(BufReader::new(s)));
        }
    });
    addr
}

/// A raw TCP upstream that serves the first connection envgate opens with `serve`, and accepts
/// no other. Returns the address it listens on.
pub async fn serve_one<F, Fut>(serve: F) -> SocketAddr
where
    F: FnOnce(Conn) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = bind(any_port()).await;
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        serve(BufReader::new(s)).await;
    });
    addr
}

/// An upstream that accepts TCP and then says nothing, holding every connection: a TLS handshake
/// to it stalls, as behind a wedged load balancer.
pub async fn silent() -> SocketAddr {
    listen(any_port(), |c| async move {
        std::future::pending::<()>().await;
        drop(c);
    })
    .await
}

/// Any free port on the loopback interface.
pub fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// One request head: its text (the request line and the header lines, as received), and what the
/// upstreams here look at: method, path, whether it asks for an upgrade, whether it is HTTP/1.0,
/// whether it says `Connection: close`, its `Host` and its `Content-Length`.
pub struct Head {
    pub text: String,
    pub method: String,
    pub path: String,
    pub upgrade: bool,
    pub http10: bool,
    pub close: bool,
    pub host: Option<String>,
    pub length: usize,
}

/// Reads one request head, up to the blank line; `None` at the end of the connection (or on a
/// head it cannot read).
pub async fn read_head(r: &mut Conn) -> Option<Head> {
    let mut first = String::new();
    if r.read_line(&mut first).await.ok()? == 0 {
        return None;
    }
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let http10 = parts.next() == Some("HTTP/1.0");
    let mut head = Head { text: first, method, path, upgrade: false, http10, close: false, host: None, length: 0 };
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            return Some(head);
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            head.length = v.trim().parse().ok()?;
        }
        if lower.starts_with("upgrade:") {
            head.upgrade = true;
        }
        if lower.starts_with("connection:") && lower.contains("close") {
            head.close = true;
        }
        if let Some(v) = lower.strip_prefix("host:") {
            head.host = Some(v.trim().to_string());
        }
        head.text.push_str(&line);
    }
}

/// Reads one request, its `Content-Length` body read and dropped.
pub async fn read_request(r: &mut Conn) -> Option<Head> {
    let head = read_head(r).await?;
    let mut body = vec![0u8; head.length];
    r.read_exact(&mut body).await.ok()?;
    Some(head)
}

/// Reads until `needle` has come (within 10 s) and returns all that came; panics if the
/// connection ends first.
pub async fn read_until(r: &mut Conn, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&got).contains(needle) {
            let n = r.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before {needle:?}: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in time: {}", String::from_utf8_lossy(&got)));
    String::from_utf8_lossy(&got).into_owned()
}

/// Answers an upgrade with `switching` (a `101` head) and then echoes every byte back, including
/// ones that look like HTTP, until envgate closes the connection.
pub async fn switch_and_echo(r: &mut Conn, switching: &[u8]) {
    if r.get_mut().write_all(switching).await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if r.get_mut().write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fault-injecting upstream: raw TCP, keep-alive, one fault for every request but the
// kernelspecs and `GET /api` (which it answers well, so that envgate can be seen serving).

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// Answers well (201 with a Location for a kernel start, 200 otherwise).
    None,
    /// Resets the connection (RST) once it has read the request.
    Reset,
    /// Answers bytes that are not HTTP.
    Garbage,
    /// Never answers; holds the connection until envgate closes it.
    StallHead,
    /// Headers and part of a 100-byte body, then nothing; holds the connection.
    StallBody,
    /// Headers and part of the body, then a reset.
    ResetBody,
    /// A chunked body, one chunk every 50 ms, until the connection breaks.
    Trickle,
    /// `101 Switching Protocols`, then echoes every byte back until envgate closes.
    Echo,
}

pub struct FaultyUpstream {
    pub addr: SocketAddr,
    /// One message per connection that envgate closed (EOF or reset seen while reading or
    /// writing): stalled and aborted upstream connections must not stay open.
    closed: mpsc::UnboundedReceiver<()>,
}

impl FaultyUpstream {
    pub async fn start(fault: Fault) -> FaultyUpstream {
        Self::start_on(any_port(), fault).await
    }

    pub async fn start_on(addr: SocketAddr, fault: Fault) -> FaultyUpstream {
        let (tx, closed) = mpsc::unbounded_channel();
        let addr = listen(addr, move |c| serve_faulty(c, fault, tx.clone())).await;
        FaultyUpstream { addr, closed }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until envgate has closed `n` of this upstream's connections.
    pub async fn expect_closed(&mut self, n: usize, limit: Duration) {
        for i in 0..n {
            tokio::time::timeout(limit, self.closed.recv())
                .await
                .unwrap_or_else(|_| panic!("envgate left an upstream connection open ({i} of {n} closed)"));
        }
    }
}

/// Reads until envgate closes the connection (or 30 s, which no test waits for).
async fn until_closed(r: &mut Conn) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

fn reset(r: Conn) {
    let s = r.into_inner();
    let _ = s.set_zero_linger();
    drop(s);
}

async fn serve_faulty(mut r: Conn, fault: Fault, closed: mpsc::UnboundedSender<()>) {
    loop {
        let Some(head) = read_request(&mut r).await else {
            // EOF (or a broken request body) between or inside requests: envgate closed it.
            let _ = closed.send(());
            return;
        };
        let fault = if head.path.ends_with("/api/kernelspecs") || head.path == "/api" { Fault::None } else { fault };
        let w = r.get_mut();
        match fault {
            Fault::None => {
                let answer = if head.path.ends_with("/api/kernelspecs") {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{SPECS}",
                        SPECS.len()
                    )
                    .into_bytes()
                } else if head.method == "POST" {
                    let body = r#"{"id":"0b6a4c1e-6b2c-4a53-9d0c-0f1d2e3f4a5b","name":"python3"}"#;
                    format!(
                        "HTTP/1.1 201 Created\r\nLocation: /api/kernels/0b6a4c1e-6b2c-4a53-9d0c-0f1d2e3f4a5b\r\n\
                         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .into_bytes()
                } else {
                    OK.to_vec()
                };
                if w.write_all(&answer).await.is_err() {
                    return;
                }
            }
            Fault::Reset => return reset(r),
            Fault::Garbage => {
                let _ = w.write_all(b"SSH-2.0-OpenSSH_9.6\r\nthis is not HTTP\r\n\r\n").await;
                until_closed(&mut r).await;
                let _ = closed.send(());
                return;
            }
            Fault::StallHead => {
                until_closed(&mut r).await;
                let _ = closed.send(());
                return;
            }
            Fault::StallBody | Fault::ResetBody => {
                let _ = w
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\npartial")
                    .await;
                if fault == Fault::ResetBody {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    return reset(r);
                }
                until_closed(&mut r).await;
                let _ = closed.send(());
                return;
            }
            Fault::Trickle => {
                let _ = w
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await;
                let deadline = Instant::now() + Duration::from_secs(30);
                while Instant::now() < deadline {
                    if w.write_all(b"6\r\nchunk\n\r\n").await.is_err() {
                        let _ = closed.send(());
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                return;
            }
            Fault::Echo if head.upgrade => {
                let switching =
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
                switch_and_echo(&mut r, switching).await;
                let _ = closed.send(());
                return;
            }
            Fault::Echo => return,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Keep-alive to the upstream

/// Counts what envgate does with its upstream connections: how many it opened, how many HTTP/1.0
/// requests came without `Connection: close`, and the `Host` of the last request. Answers every
/// request with a 200 and, like tornado, ends the connection after answering an HTTP/1.0 request
/// without saying so.
pub struct CountingUpstream {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    pub http10_kept_alive: Arc<AtomicU64>,
    pub last_host: Arc<Mutex<Option<String>>>,
}

impl CountingUpstream {
    pub async fn start() -> CountingUpstream {
        let accepted = Arc::new(AtomicU64::new(0));
        let http10_kept_alive = Arc::new(AtomicU64::new(0));
        let last_host = Arc::new(Mutex::new(None));
        let (a, k, h) = (accepted.clone(), http10_kept_alive.clone(), last_host.clone());
        let addr = listen(any_port(), move |mut r| {
            a.fetch_add(1, Ordering::SeqCst);
            let (k, h) = (k.clone(), h.clone());
            async move {
                while let Some(head) = read_request(&mut r).await {
                    if head.http10 && !head.close {
                        k.fetch_add(1, Ordering::SeqCst);
                    }
                    *h.lock().unwrap() = head.host;
                    if r.get_mut().write_all(OK).await.is_err() || head.http10 {
                        return;
                    }
                }
            }
        })
        .await;
        CountingUpstream { addr, accepted, http10_kept_alive, last_host }
    }
}

// ---------------------------------------------------------------------------------------------
// A fast fake EG (hyper), to be killed and restarted under load.

/// A fake EG: kernelspecs, `POST /api/kernels` (201 + Location), and a WebSocket echo on
/// `/api/kernels/<id>/channels`. [`FakeEg::kill`] drops its listener and every connection it holds.
pub struct FakeEg {
    stop: CancellationToken,
    tasks: TaskTracker,
}

static KERNELS: AtomicU64 = AtomicU64::new(1);

impl FakeEg {
    pub async fn start(addr: SocketAddr) -> (FakeEg, SocketAddr) {
        let l = bind(addr).await;
        let addr = l.local_addr().unwrap();
        let (stop, tasks) = (CancellationToken::new(), TaskTracker::new());
        let (st, tt) = (stop.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let s = tokio::select! {
                    a = l.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                    _ = st.cancelled() => return, // drops the listener
                };
                let _ = s.set_nodelay(true);
                let (st2, tt2, st3) = (st.clone(), tt.clone(), st.clone());
                tt.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| eg(req, st2.clone(), tt2.clone()));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .with_upgrades();
                    tokio::select! {
                        _ = conn => {}
                        _ = st3.cancelled() => {} // drops the connection
                    }
                });
            }
        });
        (FakeEg { stop, tasks }, addr)
    }

    /// Drops the listener and every connection, WebSockets included; returns once all are closed.
    pub async fn kill(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// The fake EG's routes.
async fn eg(
    req: hyper::Request<hyper::body::Incoming>,
    stop: CancellationToken,
    tasks: TaskTracker,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let json = |status: u16, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    if path == "/api/kernelspecs" {
        return Ok(json(200, SPECS.to_string()));
    }
    if path == "/api/kernels" && req.method() == hyper::Method::POST {
        let _ = req.into_body().collect().await;
        let n = KERNELS.fetch_add(1, Ordering::Relaxed);
        let id = format!("00000000-0000-4000-8000-{n:012x}");
        let mut r = json(201, format!(r#"{{"id":"{id}","name":"python3","execution_state":"starting"}}"#));
        r.headers_mut().insert("location", format!("/api/kernels/{id}").parse().unwrap());
        return Ok(r);
    }
    if path.starts_with("/api/kernels/") && path.ends_with("/channels") {
        let Some(key) = req.headers().get("sec-websocket-key") else {
            return Ok(json(400, r#"{"reason":"Bad Request","message":"not a WebSocket"}"#.into()));
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let mut req = req;
        let upgrade = hyper::upgrade::on(&mut req);
        tasks.spawn(async move {
            let Ok(io) = upgrade.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(io),
                tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            tokio::select! {
                _ = async {
                    while let Some(Ok(m)) = ws.next().await {
                        if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                            break;
                        }
                    }
                } => {}
                _ = stop.cancelled() => {} // drops the WebSocket, closing the connection
            }
        });
        return Ok(hyper::Response::builder()
            .status(101)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    Ok(json(404, r#"{"reason":"Not Found","message":"no such route"}"#.into()))
}
