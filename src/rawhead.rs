//! The one fact about a request head that hyper's parsed head hides: whether it had a
//! `Content-Length` line next to `Transfer-Encoding`. hyper drops `Content-Length` then (chunks
//! win); envgate refuses such a request instead ([`crate::wire::framing`]), and for that it
//! watches the bytes hyper reads from the client.
//!
//! [`Watched`] hands hyper every read whole, as the socket gave it, and follows the connection's
//! framing in those bytes the way hyper does: a head runs to its first empty line (empty lines
//! before a request line are skipped, as httparse skips them), then its body is skipped by its
//! `Content-Length` or by its chunks, and the next head starts after it. So the text of a body
//! (a previous request's, or chunk data) is never read as header lines, and reads are neither cut
//! nor copied: a head costs a look at the first bytes of each of its lines, a body a subtraction.
//! Where the bytes are not what hyper accepts (a bad length, a bad chunk line, a bare CR) hyper
//! refuses them and closes the connection, so nothing after them is a request, and the watch
//! stops there; it stops for good too after a head with both headers (hyper and envgate both
//! close the connection after it) and once the connection switches protocols (a spliced
//! WebSocket is passed on unlooked at).
//!
//! Heads are counted: hyper calls the service once per head, in order, so the service's count of
//! its calls names the head it is called for ([`Watch::next_head`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::wire::RawHead;

/// What [`Watched`] saw, shared with the connection's service.
#[derive(Debug)]
pub struct Watch {
    /// Heads whose end the watch has read.
    heads: AtomicU64,
    /// The index of the head that had both `Content-Length` and `Transfer-Encoding` lines, or
    /// `u64::MAX`.
    both: AtomicU64,
    /// Heads the service has been called for.
    served: AtomicU64,
    /// The connection switched protocols: its bytes are no longer HTTP, and pass unwatched.
    upgraded: AtomicBool,
}

impl Watch {
    /// What the raw head of the request the service is now called for held. Called once per
    /// request, in hyper's call of the service. A head the watch did not read to its end (it
    /// stopped before: hyper should not have parsed one) counts as one with both headers, so a
    /// chunked request envgate cannot vouch for is refused.
    pub fn next_head(&self) -> RawHead {
        let k = self.served.load(Ordering::Relaxed);
        self.served.store(k + 1, Ordering::Relaxed);
        let both = k == self.both.load(Ordering::Acquire) || k >= self.heads.load(Ordering::Acquire);
        RawHead { length_and_chunks: both }
    }

    /// The connection switched protocols (a WebSocket): its reads are no longer scanned. Called
    /// when the service answers 101, before hyper reads on.
    pub fn upgraded(&self) {
        self.upgraded.store(true, Ordering::Relaxed);
    }
}

/// A header name the scan looks for, with the colon httparse requires right after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    ContentLength,
    TransferEncoding,
}

impl Known {
    fn name(self) -> &'static [u8] {
        match self {
            Known::ContentLength => b"content-length:",
            Known::TransferEncoding => b"transfer-encoding:",
        }
    }
}

/// Where the scan is in the connection's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum At {
    /// Before a request line, where empty lines are skipped.
    Before,
    /// The CR of an empty line before a request line.
    BeforeCr,
    /// Inside the request line or a header line.
    Line,
    /// At a header line's start.
    LineStart,
    /// A CR at a header line's start: the LF after it ends the head.
    EndCr,
    /// At a header line's start, this many bytes into a name the scan looks for.
    Name(Known, u8),
    /// In a `Content-Length` value: the digits so far, and whether blanks followed them.
    Length { value: u64, digits: bool, after: bool },
    /// In a body of known length: the bytes left.
    Body(u64),
    /// Chunks, as hyper's decoder reads them.
    Chunk(Chunk),
    /// No more heads to find here: hyper reads no further request on this connection.
    Stopped,
}

/// The states of hyper's chunked decoder (`proto/h1/decode.rs`), with the same bytes allowed
/// in each, so that the scan finds the chunked body's end where hyper does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// A size line's first hex digit.
    Start,
    Size(u64),
    /// Blanks after the size.
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// After the last chunk's size line: a CR, or a trailer line.
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

/// The scan of the bytes handed on so far, and what it saw in the current head.
#[derive(Debug)]
struct Scan {
    at: At,
    /// The current head's `Content-Length` lines: whether there was one, and their value (`None`
    /// once one was not a valid length or two differed, which hyper refuses).
    length_line: bool,
    length: Option<u64>,
    /// The current head has a `Transfer-Encoding` line.
    te: bool,
}

fn is_hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

impl Scan {
    fn new() -> Scan {
        Scan { at: At::Before, length_line: false, length: None, te: false }
    }

    /// A head ended: tells `watch`, and says where its body is.
    fn head_end(&mut self, watch: &Watch) -> At {
        let k = watch.heads.load(Ordering::Relaxed);
        let (te, length_line, length) = (self.te, self.length_line, self.length);
        (self.te, self.length_line, self.length) = (false, false, None);
        if te && length_line {
            watch.both.store(k, Ordering::Release);
        }
        watch.heads.store(k + 1, Ordering::Release);
        match (te, length_line, length) {
            (true, true, _) => At::Stopped,
            (true, false, _) => At::Chunk(Chunk::Start),
            (false, true, None) => At::Stopped,
            (false, _, Some(n)) if n > 0 => At::Body(n),
            (false, _, _) => At::Before,
        }
    }

    /// A `Content-Length` value ended.
    fn length_end(&mut self, value: u64, digits: bool) {
        self.length = match self.length {
            _ if !digits => None,
            Some(v) if v != value => None,
            None if self.length_line => None,
            _ => Some(value),
        };
        self.length_line = true;
    }

    /// Follows the connection through `bytes`, the next ones hyper is handed.
    fn feed(&mut self, bytes: &[u8], watch: &Watch) {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            // Each arm consumes `b` unless it sets `again` (the byte is looked at again).
            let mut again = false;
            self.at = match self.at {
                At::Stopped => return,
                At::Line => match memchr::memchr(b'\n', &bytes[i..]) {
                    Some(j) => {
                        i += j + 1;
                        self.at = At::LineStart;
                        continue;
                    }
                    None => return,
                },
                At::Body(n) => {
                    let left = (bytes.len() - i) as u64;
                    if left < n {
                        self.at = At::Body(n - left);
                        return;
                    }
                    i += n as usize;
                    self.at = At::Before;
                    continue;
                }
                At::Chunk(Chunk::Data(n)) => {
                    let left = (bytes.len() - i) as u64;
                    if left < n {
                        self.at = At::Chunk(Chunk::Data(n - left));
                        return;
                    }
                    i += n as usize;
                    self.at = At::Chunk(Chunk::DataCr);
                    continue;
                }
                At::Before => match b {
                    b'\r' => At::BeforeCr,
                    b'\n' => At::Before,
                    _ => At::Line,
                },
                At::BeforeCr if b == b'\n' => At::Before,
                At::BeforeCr => At::Stopped,
                At::LineStart => match b.to_ascii_lowercase() {
                    b'\r' => At::EndCr,
                    b'\n' => self.head_end(watch),
                    b'c' => At::Name(Known::ContentLength, 1),
                    b't' => At::Name(Known::TransferEncoding, 1),
                    _ => At::Line,
                },
                At::EndCr if b == b'\n' => self.head_end(watch),
                At::EndCr => At::Stopped,
                At::Name(known, n) => {
                    let name = known.name();
                    if b.to_ascii_lowercase() != name[usize::from(n)] {
                        again = true;
                        At::Line
                    } else if usize::from(n) + 1 < name.len() {
                        At::Name(known, n + 1)
                    } else if known == Known::TransferEncoding {
                        self.te = true;
                        At::Line
                    } else {
                        At::Length { value: 0, digits: false, after: false }
                    }
                }
                At::Length { value, digits, after } => match b {
                    b' ' | b'\t' => At::Length { value, digits, after: digits },
                    b'0'..=b'9' if !after => {
                        match value.checked_mul(10).and_then(|v| v.checked_add(u64::from(b - b'0'))) {
                            Some(value) => At::Length { value, digits: true, after },
                            None => {
                                self.length_end(0, false);
                                At::Line
                            }
                        }
                    }
                    _ => {
                        self.length_end(value, digits && (b == b'\r' || b == b'\n'));
                        again = true;
                        At::Line
                    }
                },
                At::Chunk(c) => At::Chunk(match (c, b) {
                    (Chunk::Start, _) => match is_hex(b) {
                        Some(d) => Chunk::Size(d),
                        None => return self.stop(),
                    },
                    (Chunk::Size(n), _) if is_hex(b).is_some() => {
                        match n.checked_mul(16).and_then(|n| n.checked_add(is_hex(b).unwrap_or(0))) {
                            Some(n) => Chunk::Size(n),
                            None => return self.stop(),
                        }
                    }
                    (Chunk::Size(n) | Chunk::SizeLws(n), b' ' | b'\t') => Chunk::SizeLws(n),
                    (Chunk::Size(n) | Chunk::SizeLws(n), b';') => Chunk::Extension(n),
                    (Chunk::Size(n) | Chunk::SizeLws(n) | Chunk::Extension(n), b'\r') => Chunk::SizeLf(n),
                    (Chunk::Extension(n), _) => match memchr::memchr2(b'\r', b'\n', &bytes[i..]) {
                        Some(j) if bytes[i + j] == b'\r' => {
                            i += j + 1;
                            self.at = At::Chunk(Chunk::SizeLf(n));
                            continue;
                        }
                        Some(_) => return self.stop(),
                        None => return,
                    },
                    (Chunk::SizeLf(0), b'\n') => Chunk::EndCr,
                    (Chunk::SizeLf(n), b'\n') => Chunk::Data(n),
                    (Chunk::DataCr, b'\r') => Chunk::DataLf,
                    (Chunk::DataLf, b'\n') => Chunk::Start,
                    (Chunk::EndCr, b'\r') => Chunk::EndLf,
                    // Any other byte starts a trailer line (a lone LF too, as in hyper).
                    (Chunk::EndCr, _) => Chunk::Trailer,
                    (Chunk::Trailer, _) => match memchr::memchr(b'\r', &bytes[i..]) {
                        Some(j) => {
                            i += j + 1;
                            self.at = At::Chunk(Chunk::TrailerLf);
                            continue;
                        }
                        None => return,
                    },
                    (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
                    (Chunk::EndLf, b'\n') => {
                        i += 1;
                        self.at = At::Before;
                        continue;
                    }
                    // Anything else hyper's decoder refuses, and closes the connection.
                    _ => return self.stop(),
                }),
            };
            if !again {
                i += 1;
            }
        }
    }

    fn stop(&mut self) {
        self.at = At::Stopped;
    }
}

/// A client connection whose reads are watched for the heads in them ([`Watch`]). Reads and
/// writes pass straight through.
pub struct Watched<S> {
    io: S,
    scan: Scan,
    watch: Arc<Watch>,
}

impl<S> Watched<S> {
    /// `io`, watched; the [`Watch`] is for the connection's service.
    pub fn new(io: S) -> (Watched<S>, Arc<Watch>) {
        let watch = Arc::new(Watch {
            heads: AtomicU64::new(0),
            both: AtomicU64::new(u64::MAX),
            served: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
        });
        (Watched { io, scan: Scan::new(), watch: watch.clone() }, watch)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if this.scan.at != At::Stopped && !this.watch.upgraded.load(Ordering::Relaxed) {
            this.scan.feed(&buf.filled()[before..], &this.watch);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The watch after `stream` was read `piece` bytes at a time: heads ended, and the index of
    /// the head with both headers.
    fn scan(stream: &[u8], piece: usize) -> (u64, Option<u64>, bool) {
        let (_, watch) = Watched::new(());
        let mut scan = Scan::new();
        for p in stream.chunks(piece) {
            scan.feed(p, &watch);
        }
        let both = watch.both.load(Ordering::Relaxed);
        (watch.heads.load(Ordering::Relaxed), (both != u64::MAX).then_some(both), scan.at == At::Stopped)
    }

    /// The same watch whatever the pieces the bytes arrive in.
    fn scanned(stream: &[u8]) -> (u64, Option<u64>, bool) {
        let whole = scan(stream, stream.len().max(1));
        for piece in [1, 2, 3, 5, 7, 16, 64] {
            assert_eq!(scan(stream, piece), whole, "pieces of {piece}: {:?}", String::from_utf8_lossy(stream));
        }
        whole
    }

    const GET: &str = "GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    /// Header text a body may hold; read as a head, it would be one with both headers.
    const FAKE: &str = "\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn bodies_are_skipped_whatever_text_they_hold() {
        let post = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n{FAKE}", FAKE.len());
        assert_eq!(scanned(format!("{post}{GET}{post}").as_bytes()), (3, None, false));
        // A chunk's data, a chunk extension and a trailer.
        let chunked = format!(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=\"a\"\r\n{FAKE}\r\n3 \t\r\nabc\r\n0\r\nX-T: Content-Length: 1\r\n\r\n",
            FAKE.len()
        );
        assert_eq!(scanned(format!("{chunked}{chunked}{GET}").as_bytes()), (3, None, false));
        // Content-Length zero, a duplicated equal length, an upper-case size, LF line ends.
        let more = format!(
            "GET / HTTP/1.1\r\ncontent-length: 0\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\nCONTENT-LENGTH:3 \r\n\r\n\r\n\r\
             POST / HTTP/1.1\nTransfer-Encoding: chunked\n\nA\r\n\n\n\n\n\n\n\n\n\n\n\r\n0\r\n\r\n\r\n\n{GET}"
        );
        assert_eq!(scanned(more.as_bytes()), (4, None, false));
    }

    #[test]
    fn a_head_with_both_is_found_by_its_index() {
        for both in [
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
            "transfer-encoding: chunked\r\ncontent-LENGTH: 4\r\n",
            "Content-Length: 4\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n",
            "Content-Length: 4\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: x\r\n",
        ] {
            let stream = format!("{GET}{GET}POST / HTTP/1.1\r\n{both}\r\n0\r\n\r\n{GET}");
            assert_eq!(scanned(stream.as_bytes()), (3, Some(2), true), "{both:?}");
            assert_eq!(scanned(stream.replace("\r\n", "\n").as_bytes()), (3, Some(2), true), "{both:?}, LF");
        }
        // Names that only look like them.
        let stream = format!(
            "POST / HTTP/1.1\r\nX-Content-Length: 4\r\nContent-Lengthy: 4\r\nTransfer-Encoding: chunked\r\nContent-Type: a\r\n\r\n0\r\n\r\n{GET}"
        );
        assert_eq!(scanned(stream.as_bytes()), (2, None, false));
    }

    #[test]
    fn empty_lines_before_a_request_line_are_skipped() {
        let stream = format!("\r\n\n\r\n{GET}\r\n{GET}");
        assert_eq!(scanned(stream.as_bytes()), (2, None, false));
    }

    #[test]
    fn bytes_hyper_refuses_stop_the_scan() {
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nx\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;a\nb\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n\rX",
        ] {
            // The head after it is never counted: hyper reads no request behind these bytes.
            let (heads, _, stopped) = scanned(format!("{bad}{GET}").as_bytes());
            assert!(stopped, "{bad:?}");
            assert_eq!(heads, 1 - u64::from(bad.ends_with("\rX")), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn an_upgraded_connection_is_not_scanned() {
        let stream = format!("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n{FAKE}{FAKE}");
        let (client, server) = tokio::io::duplex(4096);
        let (mut w, watch) = Watched::new(server);
        let mut client = client;
        client.write_all(stream.as_bytes()).await.unwrap();
        drop(client);
        let mut buf = [0u8; 38];
        w.read_exact(&mut buf).await.unwrap();
        assert_eq!(watch.next_head(), RawHead { length_and_chunks: false });
        watch.upgraded();
        let mut rest = Vec::new();
        w.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, [FAKE, FAKE].concat().as_bytes(), "passed on whole");
        assert_eq!(watch.heads.load(Ordering::Relaxed), 1, "not scanned");
    }

    /// What a real hyper server over a watched connection hands its service, per request: its
    /// path, whether it had Transfer-Encoding, and the watch's word on its raw head.
    async fn through_hyper(stream: &[u8]) -> Vec<(String, bool, bool)> {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (io, watch) = Watched::new(server);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let raw = watch.next_head();
            let te = req.headers().contains_key(http::header::TRANSFER_ENCODING);
            log.lock().unwrap().push((req.uri().path().to_string(), te, raw.length_and_chunks));
            async move {
                let _ = req.into_body().collect().await;
                Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
            .with_upgrades();
        let server = tokio::spawn(conn);
        client.write_all(stream).await.unwrap();
        client.shutdown().await.unwrap();
        let mut answers = Vec::new();
        let _ = client.read_to_end(&mut answers).await;
        let _ = server.await;
        let seen = seen.lock().unwrap().clone();
        seen
    }

    #[tokio::test]
    async fn hyper_and_the_watch_agree_on_every_head() {
        let post = format!("POST /cl HTTP/1.1\r\nContent-Length: {}\r\n\r\n{FAKE}", FAKE.len());
        let chunked = format!(
            "POST /te HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x};e=1\r\n{FAKE}\r\n0\r\nX-T: Content-Length: 1\r\n\r\n",
            FAKE.len()
        );
        let both = "POST /both HTTP/1.1\r\ntransfer-encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n";
        let stream = format!("\r\n{GET}{post}{chunked}\r\n{chunked}{post}{GET}{both}{GET}");
        let seen = through_hyper(stream.as_bytes()).await;
        let want: Vec<(String, bool, bool)> = [
            ("/a", false, false),
            ("/cl", false, false),
            ("/te", true, false),
            ("/te", true, false),
            ("/cl", false, false),
            ("/a", false, false),
            ("/both", true, true),
        ]
        .iter()
        .map(|(p, te, both)| (p.to_string(), *te, *both))
        .collect();
        assert_eq!(seen, want, "hyper closes after the head with both; nothing behind it is read");
    }
}
