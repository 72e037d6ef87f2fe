//! A deliberately tiny HTTP/1.1 client over `tokio::net::TcpStream`.
//!
//! Tests need to see exactly what goes on the wire (status, raw headers, odd framing), which a full client
//! library would hide or normalise. One request per connection (`Connection: close`); responses framed by
//! `Content-Length`, `Transfer-Encoding: chunked`, or end of stream.

#![allow(dead_code)]

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Whole-exchange limit, so a hung server fails the test instead of hanging it.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names and values as received (original case, original order, duplicates kept).
    pub headers: Vec<(String, String)>,
    /// Body after removing chunked framing.
    pub body: Vec<u8>,
}

impl Response {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Body parsed as JSON; panics with the body text if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.text()))
    }
}

/// Sends one request to `addr` (e.g. `"127.0.0.1:8888"`) and reads the response.
///
/// Adds `Host: addr`, `Connection: close` and `Content-Length` unless `headers` already has a header of
/// that name (a `Transfer-Encoding` header also suppresses `Content-Length`), so tests can send unusual
/// framing on purpose. `body` is written as is.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<Response> {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    if !has("connection") {
        head.push_str("Connection: close\r\n");
    }
    let body_method = matches!(method, "POST" | "PUT" | "PATCH");
    if !has("content-length") && !has("transfer-encoding") && (body_method || !body.is_empty()) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    request_raw(addr, &raw, method == "HEAD").await
}

/// Writes `raw` (a complete request, exactly as given) and reads one response. `head_request` says whether
/// the response has no body regardless of its headers (answer to HEAD).
pub async fn request_raw(addr: &str, raw: &[u8], head_request: bool) -> io::Result<Response> {
    tokio::time::timeout(TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(raw).await?;
        read_response(&mut stream, head_request).await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no complete response from {addr}")))?
}

/// Like [`request_raw`], over a connection the caller opened (e.g. TLS).
pub async fn request_raw_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    raw: &[u8],
    head_request: bool,
) -> io::Result<Response> {
    tokio::time::timeout(TIMEOUT, async {
        stream.write_all(raw).await?;
        read_response(&mut stream, head_request).await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no complete response"))?
}

async fn read_response<S: AsyncRead + Unpin>(stream: &mut S, head_request: bool) -> io::Result<Response> {
    let mut buf = Vec::new();
    loop {
        let (status, headers, body_start) = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let (status, headers) = parse_head(&buf[..end])?;
                break (status, headers, end + 4);
            }
            if read_more(stream, &mut buf).await? == 0 {
                return Err(bad(format!(
                    "connection closed before the end of the response head: {:?}",
                    String::from_utf8_lossy(&buf)
                )));
            }
        };
        buf.drain(..body_start);
        // Interim responses (100 Continue, ...) precede the real one; 101 ends HTTP on this connection.
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let mut resp = Response { status, headers, body: Vec::new() };
        if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
            return Ok(resp);
        }
        let chunked = resp.header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        if chunked {
            resp.body = read_chunked(stream, buf).await?;
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.trim().parse().map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
            while buf.len() < len {
                if read_more(stream, &mut buf).await? == 0 {
                    return Err(bad(format!("body ended after {} of {len} bytes", buf.len())));
                }
            }
            buf.truncate(len);
            resp.body = buf;
        } else {
            while read_more(stream, &mut buf).await? != 0 {}
            resp.body = buf;
        }
        return Ok(resp);
    }
}

/// Decodes a chunked body; `buf` holds what was already read past the head. Trailers are skipped.
async fn read_chunked<S: AsyncRead + Unpin>(stream: &mut S, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = find(&buf, b"\r\n") {
                break i;
            }
            if read_more(stream, &mut buf).await? == 0 {
                return Err(bad("connection closed inside a chunk size line".into()));
            }
        };
        let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size_hex = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| bad(format!("bad chunk size {line:?}")))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailer section ends with an empty line; tolerate a server that closes right away.
            while !(buf.starts_with(b"\r\n") || find(&buf, b"\r\n\r\n").is_some()) {
                if read_more(stream, &mut buf).await? == 0 {
                    break;
                }
            }
            return Ok(body);
        }
        while buf.len() < size + 2 {
            if read_more(stream, &mut buf).await? == 0 {
                return Err(bad("connection closed inside a chunk".into()));
            }
        }
        body.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            return Err(bad("chunk not followed by CRLF".into()));
        }
        buf.drain(..size + 2);
    }
}

fn parse_head(head: &[u8]) -> io::Result<(u16, Vec<(String, String)>)> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.to_string(), v.trim().to_string())).collect();
    Ok((status, headers))
}

async fn read_more<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}
