//! The one body type envgate sends both ways: a streamed hyper body, a buffer it wrote itself,
//! or a buffered prefix followed by the rest of a stream.
//!
//! An enum rather than a boxed trait object, so the pass-through path allocates nothing for it.
//! A streamed body ends with an error when the other side sends nothing for `body_idle_timeout`
//! (see [`Streamed`]), so that hyper aborts that connection instead of holding it forever.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// Why a streamed body ended early.
#[derive(Debug)]
pub enum StreamError {
    /// The other side failed: reset, closed early, a malformed chunk.
    Hyper(hyper::Error),
    /// The other side sent nothing for this long.
    Idle(Duration),
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Hyper(e) => write!(f, "{e}"),
            StreamError::Idle(d) => write!(f, "no body data for {}", humantime::format_duration(*d)),
        }
    }
}

/// `Hyper` is transparent: it shows hyper's message and gives hyper's cause, so that an error
/// shown with its causes says each once.
impl std::error::Error for StreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StreamError::Hyper(e) => e.source(),
            StreamError::Idle(_) => None,
        }
    }
}

/// A hyper body streamed from the other side, which ends with [`StreamError::Idle`] when it yields no
/// frame for `idle` while envgate waits for one (time spent while the receiving side is not asking
/// for more, e.g. a slow reader, does not count).
///
/// The timer is allocated at the first wait only, and re-armed (lock-free, tokio extends a timer's
/// deadline in place) once per wait, not per frame; a body that never waits never has one. It is
/// boxed because hyper's client needs an `Unpin` body and a [`Sleep`] is not.
#[derive(Debug)]
pub struct Streamed {
    inner: Incoming,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer is armed for the current wait.
    waiting: bool,
}

impl Streamed {
    pub fn new(inner: Incoming, idle: Duration) -> Streamed {
        Streamed { inner, idle, timer: None, waiting: false }
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame.map(|f| f.map_err(StreamError::Hyper)))
            }
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let deadline = Instant::now() + this.idle;
                    match &mut this.timer {
                        Some(t) => t.as_mut().reset(deadline),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                match this.timer.as_mut().map(|t| t.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => Poll::Ready(Some(Err(StreamError::Idle(this.idle)))),
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug)]
pub enum ProxyBody {
    /// Streamed from the other side, frame by frame.
    Stream(Streamed),
    /// A whole body envgate holds (rewritten, or an error). `None` once sent.
    Full(Option<Bytes>),
    /// Bytes already read, then the rest of the stream (a body too large to rewrite).
    Prefixed { prefix: Option<Bytes>, rest: Streamed },
}

impl ProxyBody {
    pub fn full(b: impl Into<Bytes>) -> ProxyBody {
        let b = b.into();
        ProxyBody::Full(if b.is_empty() { None } else { Some(b) })
    }

    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }

    /// A body streamed from the other side, ended when it is idle for `idle`.
    pub fn stream(b: Incoming, idle: Duration) -> ProxyBody {
        ProxyBody::Stream(Streamed::new(b, idle))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        match self.get_mut() {
            ProxyBody::Stream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Prefixed { prefix, rest } => match prefix.take() {
                Some(p) => Poll::Ready(Some(Ok(Frame::data(p)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Stream(b) => b.is_end_stream(),
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Stream(b) => b.size_hint(),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Prefixed { prefix, rest } => {
                let p = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let r = rest.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(r.lower() + p);
                if let Some(u) = r.upper() {
                    h.set_upper(u + p);
                }
                h
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A response from a raw upstream that writes `head` then each of `parts` after its pause.
    pub(crate) async fn response(head: &'static str, parts: Vec<(u64, &'static str)>) -> Incoming {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(head.as_bytes()).await.unwrap();
            for (pause, part) in parts {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                s.write_all(part.as_bytes()).await.unwrap();
            }
            // Hold the connection open, sending nothing more.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::builder().uri("/").header("host", "x").body(ProxyBody::empty()).unwrap();
        tx.send_request(req).await.unwrap().into_body()
    }

    #[tokio::test]
    async fn a_stalled_stream_ends_with_an_idle_error() {
        let inner = response("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", vec![]).await;
        let mut body = ProxyBody::stream(inner, Duration::from_millis(300));
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"abc");
        let started = std::time::Instant::now();
        let e =
            tokio::time::timeout(Duration::from_secs(5), body.frame()).await.expect("no hang").unwrap().unwrap_err();
        assert!(matches!(e, StreamError::Idle(_)), "{e}");
        assert_eq!(e.to_string(), "no body data for 300ms");
        assert!(started.elapsed() >= Duration::from_millis(290), "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn the_idle_timer_restarts_with_every_frame() {
        // Five gaps of 150 ms: 750 ms in all, longer than the 300 ms idle timeout, never idle that long.
        let parts = vec![(150, "1"), (150, "2"), (150, "3"), (150, "4"), (150, "5")];
        let inner = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", parts).await;
        let body = ProxyBody::stream(inner, Duration::from_millis(300));
        let all = tokio::time::timeout(Duration::from_secs(5), body.collect()).await.expect("no hang").unwrap();
        assert_eq!(&all.to_bytes()[..], b"12345");
    }
}
