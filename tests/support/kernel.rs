//! A minimal Jupyter kernel client over the `/api/kernels/{id}/channels` WebSocket, in both framings that
//! jupyter_server speaks:
//!
//! - [`Protocol::Legacy`]: no subprotocol; each message is a JSON text frame with a `"channel"` key.
//! - [`Protocol::V1`]: subprotocol `v1.kernel.websocket.jupyter.org`; binary frames laid out as in
//!   jupyter_server's `serialize_msg_to_ws_v1`: u64 LE count of offsets, then that many u64 LE offsets,
//!   then channel name, header, parent_header, metadata, content (JSON) and any buffers.
//!
//! Enough to prove a kernel really runs (and what environment it got) through EG or through the proxy.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const V1_SUBPROTOCOL: &str = "v1.kernel.websocket.jupyter.org";

/// Whole `run_code` limit: kernel start (~0.3 s) plus execution, with a wide margin for a loaded CI box.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to keep retrying the WebSocket connect / kernel_info while the kernel is still starting.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// JSON text frames, no subprotocol offered (what jupyter_server's GatewayClient uses).
    Legacy,
    /// Offers `v1.kernel.websocket.jupyter.org`; binary frames (what JupyterLab uses when offered).
    V1,
}

/// Connects to `ws_url` (e.g. `ws://127.0.0.1:PORT/api/kernels/ID/channels`), waits for the kernel to
/// answer `kernel_info_request`, runs `code`, and returns what it printed to stdout.
///
/// `headers` are added to the upgrade request (e.g. `("Authorization", "token X")`). Connection failures
/// and 5xx answers are retried for a while, since the kernel may still be starting right after
/// `POST /api/kernels`; a 4xx answer is returned at once as `Err("HTTP 403 ...")`. An execution error in the
/// kernel is `Err` with the error's name and value.
pub async fn run_code(
    ws_url: &str,
    headers: &[(&str, &str)],
    protocol: Protocol,
    code: &str,
) -> Result<String, String> {
    tokio::time::timeout(RUN_TIMEOUT, async {
        let mut kernel = KernelWs::connect(ws_url, headers, protocol).await?;
        kernel.wait_ready().await?;
        let out = kernel.execute(code).await;
        kernel.close().await;
        out
    })
    .await
    .map_err(|_| format!("no result from {ws_url} within {RUN_TIMEOUT:?}"))?
}

/// One kernel message, decoded from either framing.
#[derive(Debug, Clone)]
pub struct KernelMsg {
    pub channel: String,
    pub header: Value,
    pub parent_header: Value,
    pub metadata: Value,
    pub content: Value,
}

impl KernelMsg {
    pub fn msg_type(&self) -> &str {
        self.header["msg_type"].as_str().unwrap_or("")
    }
    pub fn parent_id(&self) -> &str {
        self.parent_header["msg_id"].as_str().unwrap_or("")
    }
}

/// An open channels WebSocket. `run_code` is the usual entry point; this is for tests that need more.
pub struct KernelWs {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    protocol: Protocol,
    session: String,
}

impl KernelWs {
    /// Opens the WebSocket, retrying connection errors and 5xx until [`READY_TIMEOUT`].
    pub async fn connect(ws_url: &str, headers: &[(&str, &str)], protocol: Protocol) -> Result<KernelWs, String> {
        Self::connect_with(ws_url, headers, protocol, None).await
    }

    /// [`KernelWs::connect`] with a TLS configuration for `wss://` URLs (e.g. trusting a test CA).
    pub async fn connect_with(
        ws_url: &str,
        headers: &[(&str, &str)],
        protocol: Protocol,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<KernelWs, String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let mut req = ws_url.into_client_request().map_err(|e| format!("bad url {ws_url}: {e}"))?;
            for (name, value) in headers {
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name}: {e}"))?;
                let value = HeaderValue::from_str(value).map_err(|e| format!("header value {value:?}: {e}"))?;
                req.headers_mut().append(name, value);
            }
            if protocol == Protocol::V1 {
                req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(V1_SUBPROTOCOL));
            }
            let connector = tls.clone().map(tokio_tungstenite::Connector::Rustls);
            let err = match tokio_tungstenite::connect_async_tls_with_config(req, None, false, connector).await {
                // tungstenite itself fails the handshake if V1 was offered and the server chose none.
                Ok((ws, _)) => return Ok(KernelWs { ws, protocol, session: new_id("session") }),
                Err(WsError::Http(resp)) => {
                    let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
                    let err = format!("HTTP {} from {ws_url}: {body}", resp.status());
                    if !resp.status().is_server_error() {
                        return Err(err);
                    }
                    err
                }
                Err(e @ WsError::Io(_)) => format!("{ws_url}: {e}"),
                Err(e) => return Err(format!("WebSocket handshake with {ws_url} failed: {e}")),
            };
            if Instant::now() > deadline {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sends `kernel_info_request` until the kernel answers (resent every second, up to [`READY_TIMEOUT`]).
    pub async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut asked = Vec::new();
        while Instant::now() < deadline {
            asked.push(self.send("shell", "kernel_info_request", json!({})).await?);
            let round = Instant::now() + Duration::from_secs(1);
            while let Ok(msg) = tokio::time::timeout_at(round.into(), self.recv()).await {
                let msg = msg?;
                if msg.msg_type() == "kernel_info_reply" && asked.iter().any(|id| id == msg.parent_id()) {
                    return Ok(());
                }
            }
        }
        Err(format!("kernel did not answer kernel_info_request within {READY_TIMEOUT:?}"))
    }

    /// Runs `code`; returns its stdout once both `execute_reply` and the `idle` status have arrived.
    pub async fn execute(&mut self, code: &str) -> Result<String, String> {
        let content = json!({
            "code": code, "silent": false, "store_history": false, "user_expressions": {},
            "allow_stdin": false, "stop_on_error": true,
        });
        let id = self.send("shell", "execute_request", content).await?;
        let (mut stdout, mut stderr) = (String::new(), String::new());
        let mut reply: Option<Value> = None;
        let mut idle = false;
        while reply.is_none() || !idle {
            let msg = self.recv().await?;
            if msg.parent_id() != id {
                continue;
            }
            match (msg.channel.as_str(), msg.msg_type()) {
                ("iopub", "stream") => {
                    let text = msg.content["text"].as_str().unwrap_or("");
                    match msg.content["name"].as_str() {
                        Some("stdout") => stdout.push_str(text),
                        _ => stderr.push_str(text),
                    }
                }
                ("iopub", "status") => idle = msg.content["execution_state"] == "idle",
                ("shell", "execute_reply") => reply = Some(msg.content),
                _ => {}
            }
        }
        let reply = reply.unwrap();
        if reply["status"] == "ok" {
            Ok(stdout)
        } else {
            Err(format!(
                "execution failed: {} {}: {}\nstdout: {stdout}\nstderr: {stderr}",
                reply["status"], reply["ename"], reply["evalue"]
            ))
        }
    }

    /// Sends a request; returns its msg_id.
    pub async fn send(&mut self, channel: &str, msg_type: &str, content: Value) -> Result<String, String> {
        let msg_id = new_id("msg");
        let msg = KernelMsg {
            channel: channel.to_string(),
            header: json!({
                "msg_id": msg_id, "msg_type": msg_type, "session": self.session,
                "username": "envgate-test", "date": now_iso8601(), "version": "5.3",
            }),
            parent_header: json!({}),
            metadata: json!({}),
            content,
        };
        self.ws.send(encode(&msg, self.protocol)).await.map_err(|e| format!("send {msg_type}: {e}"))?;
        Ok(msg_id)
    }

    /// Next kernel message (control frames are skipped; tungstenite answers pings itself).
    pub async fn recv(&mut self) -> Result<KernelMsg, String> {
        loop {
            let frame = match self.ws.next().await {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Err(format!("WebSocket error: {e}")),
                None => return Err("WebSocket closed".into()),
            };
            match frame {
                Message::Text(_) | Message::Binary(_) => return decode(frame, self.protocol),
                Message::Close(f) => return Err(format!("WebSocket closed by server: {f:?}")),
                _ => {}
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Encodes `msg` as the frame the given protocol uses.
pub fn encode(msg: &KernelMsg, protocol: Protocol) -> Message {
    match protocol {
        Protocol::Legacy => Message::Text(
            json!({
                "channel": msg.channel, "header": msg.header, "parent_header": msg.parent_header,
                "metadata": msg.metadata, "content": msg.content, "buffers": [],
            })
            .to_string(),
        ),
        Protocol::V1 => {
            let parts: Vec<Vec<u8>> = [&msg.header, &msg.parent_header, &msg.metadata, &msg.content]
                .iter()
                .map(|v| serde_json::to_vec(v).unwrap())
                .collect();
            Message::Binary(encode_v1(&msg.channel, &parts))
        }
    }
}

/// jupyter_server's `serialize_msg_to_ws_v1`: offsets point at the channel, each part, and the end.
pub fn encode_v1(channel: &str, parts: &[Vec<u8>]) -> Vec<u8> {
    let n_offsets = parts.len() + 2;
    let mut offsets = vec![8 * (1 + n_offsets)];
    offsets.push(offsets[0] + channel.len());
    for p in parts {
        offsets.push(offsets.last().unwrap() + p.len());
    }
    let mut out = (n_offsets as u64).to_le_bytes().to_vec();
    for o in &offsets {
        out.extend_from_slice(&(*o as u64).to_le_bytes());
    }
    out.extend_from_slice(channel.as_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
    out
}

/// jupyter_server's `deserialize_msg_from_ws_v1`: returns the channel and the parts (header,
/// parent_header, metadata, content, buffers...).
pub fn decode_v1(frame: &[u8]) -> Result<(String, Vec<Vec<u8>>), String> {
    let word = |i: usize| -> Result<usize, String> {
        let bytes = frame.get(8 * i..8 * i + 8).ok_or("v1 frame too short for its offset table")?;
        Ok(u64::from_le_bytes(bytes.try_into().unwrap()) as usize)
    };
    let n = word(0)?;
    if n < 2 {
        return Err(format!("v1 frame has {n} offsets"));
    }
    let offsets = (1..=n).map(word).collect::<Result<Vec<_>, _>>()?;
    let slice = |a: usize, b: usize| frame.get(a..b).ok_or_else(|| format!("v1 offsets {a}..{b} out of range"));
    let channel = String::from_utf8_lossy(slice(offsets[0], offsets[1])?).into_owned();
    let parts = offsets.windows(2).skip(1).map(|w| slice(w[0], w[1]).map(<[u8]>::to_vec)).collect::<Result<_, _>>()?;
    Ok((channel, parts))
}

/// Decodes a data frame. V1 accepts only binary frames. Legacy text frames are JSON; legacy binary frames (messages with buffers) are
/// jupyter_server's `serialize_binary_message` (u32 BE count, u32 BE offsets, JSON first).
pub fn decode(frame: Message, protocol: Protocol) -> Result<KernelMsg, String> {
    let json_msg = |v: Value| KernelMsg {
        channel: v["channel"].as_str().unwrap_or("").to_string(),
        header: v["header"].clone(),
        parent_header: v["parent_header"].clone(),
        metadata: v["metadata"].clone(),
        content: v["content"].clone(),
    };
    match (frame, protocol) {
        // Strict: a text frame on a v1 connection means the server is not really speaking v1.
        (Message::Text(text), Protocol::V1) => Err(format!("text frame on a v1 connection: {text}")),
        (Message::Text(text), Protocol::Legacy) => {
            serde_json::from_str(&text).map(json_msg).map_err(|e| format!("bad JSON frame ({e}): {text}"))
        }
        (Message::Binary(bin), Protocol::V1) => {
            let (channel, parts) = decode_v1(&bin)?;
            if parts.len() < 4 {
                return Err(format!("v1 frame has {} parts", parts.len()));
            }
            let part = |i: usize| serde_json::from_slice::<Value>(&parts[i]).map_err(|e| format!("v1 part {i}: {e}"));
            Ok(KernelMsg { channel, header: part(0)?, parent_header: part(1)?, metadata: part(2)?, content: part(3)? })
        }
        (Message::Binary(bin), Protocol::Legacy) => {
            let be = |i: usize| -> Result<usize, String> {
                let b = bin.get(4 * i..4 * i + 4).ok_or("legacy binary frame too short")?;
                Ok(u32::from_be_bytes(b.try_into().unwrap()) as usize)
            };
            let (start, end) = (be(1)?, if be(0)? > 1 { be(2)? } else { bin.len() });
            let first = bin.get(start..end).ok_or("legacy binary offsets out of range")?;
            serde_json::from_slice(first).map(json_msg).map_err(|e| format!("legacy binary frame: {e}"))
        }
        (other, _) => Err(format!("not a data frame: {other:?}")),
    }
}

/// Unique enough for msg and session ids across parallel tests and processes.
fn new_id(kind: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("envgate-{kind}-{}-{nanos:x}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SS.ffffffZ`, the form Jupyter headers carry.
fn now_iso8601() -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let (days, secs) = ((now.as_secs() / 86400) as i64, now.as_secs() % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_micros()
    )
}
