//! The idle keep-alive connections to the upstream, one pool per worker thread.
//!
//! envgate talks to exactly one upstream, over HTTP/1.1, from one thread per pool, so the pool is
//! a plain stack of ready senders behind an uncontended lock: no per-host map, no hashing, no
//! waiter queue. The most recently used connection is taken first (it is the least likely to
//! have been closed by the upstream's idle timer); connections idle for longer than
//! `idle_timeout` are never handed out, and a reaper task drops them, so an idle envgate does
//! not hold the upstream's sockets forever.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::client::conn::http1::SendRequest;
use tokio::sync::Notify;

use crate::body::ProxyBody;

/// The sending half of one upstream HTTP/1.1 connection.
pub type Sender = SendRequest<ProxyBody>;

/// A stack of idle upstream connections (cheap to clone: clones share the stack).
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// Signalled when a connection is put back, for a request waiting on a connect.
    returned: Notify,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Debug, Default)]
struct State {
    /// Oldest first; `since` only grows along the stack.
    idle: Vec<Idle>,
    reaper: bool,
}

#[derive(Debug)]
struct Idle {
    tx: Sender,
    since: Instant,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Pool {
        Pool { inner: Arc::new(Inner { state: Mutex::default(), returned: Notify::new(), max_idle, idle_timeout }) }
    }

    /// The most recently used idle connection that can take a request now, if any.
    pub fn take(&self) -> Option<Sender> {
        let mut st = self.inner.lock();
        while let Some(i) = st.idle.pop() {
            if i.since.elapsed() >= self.inner.idle_timeout {
                // Everything below it is older still.
                st.idle.clear();
                return None;
            }
            // Not ready means the upstream closed it while it sat here.
            if i.tx.is_ready() {
                return Some(i.tx);
            }
        }
        None
    }

    /// The next connection that is idle, waiting for one to be given back if none is.
    pub async fn next_idle(&self) -> Sender {
        loop {
            // Created before the look, so that a give-back in between is not missed.
            let returned = self.inner.returned.notified();
            if let Some(tx) = self.take() {
                return tx;
            }
            returned.await;
        }
    }

    /// Returns a connection whose response head has arrived: now if it can take the next
    /// request, else once its response body has been read (a task waits for that). A
    /// connection that closes meanwhile is simply dropped.
    pub fn give_back(&self, mut tx: Sender) {
        if tx.is_ready() {
            self.put(tx);
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            if tx.ready().await.is_ok() {
                pool.put(tx);
            }
        });
    }

    fn put(&self, tx: Sender) {
        let mut st = self.inner.lock();
        if st.idle.len() >= self.inner.max_idle {
            return;
        }
        st.idle.push(Idle { tx, since: Instant::now() });
        if !st.reaper {
            st.reaper = true;
            tokio::spawn(reap(Arc::downgrade(&self.inner), self.inner.idle_timeout));
        }
        drop(st);
        self.inner.returned.notify_one();
    }

    /// How many connections sit idle (for tests).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.inner.lock().idle.len()
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The lock guards no invariant a panic could break halfway.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Drops connections that have been idle too long or were closed by the upstream, until the
/// pool itself is dropped.
async fn reap(pool: Weak<Inner>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(p) = pool.upgrade() else { return };
        let now = Instant::now();
        p.lock().idle.retain(|i| now.duration_since(i.since) < p.idle_timeout && !i.tx.is_closed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A sender over an in-memory connection whose far end answers each request with a 200, its
    /// two-byte body 20 ms after its head.
    async fn sender() -> Sender {
        let (near, mut far) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = far.read(&mut buf).await {
                if n == 0 || far.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                if far.write_all(b"ok").await.is_err() {
                    return;
                }
            }
        });
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near)).await.unwrap();
        tokio::spawn(conn);
        tx
    }

    /// Waits (a bounded number of scheduler turns) for the pool to hold `n` idle connections.
    async fn settle(pool: &Pool, n: usize) -> usize {
        for _ in 0..1000 {
            if pool.idle() == n {
                break;
            }
            tokio::task::yield_now().await;
        }
        pool.idle()
    }

    #[tokio::test]
    async fn hands_back_the_most_recent_ready_connection() {
        let pool = Pool::new(2, Duration::from_secs(60));
        assert!(pool.take().is_none());
        for _ in 0..3 {
            pool.give_back(sender().await);
        }
        assert_eq!(settle(&pool, 2).await, 2, "no more than max_idle are kept");
        let mut tx = pool.take().unwrap();
        let resp = tx.send_request(http::Request::new(ProxyBody::empty())).await.unwrap();
        assert!(!tx.is_ready(), "busy until the body is read");
        pool.give_back(tx);
        assert_eq!(pool.idle(), 1);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
        assert_eq!(settle(&pool, 2).await, 2, "back once its body was read");
    }

    #[tokio::test]
    async fn a_waiter_gets_the_next_connection_given_back() {
        let pool = Pool::new(8, Duration::from_secs(60));
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move { pool.next_idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        pool.give_back(sender().await);
        let tx = tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap();
        assert!(tx.is_ready());
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn skips_closed_and_stale_connections() {
        let pool = Pool::new(8, Duration::from_secs(60));
        let (near, far) = tokio::io::duplex(64);
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near)).await.unwrap();
        let conn = tokio::spawn(conn);
        pool.give_back(tx);
        drop(far);
        let _ = conn.await;
        assert!(pool.take().is_none(), "a connection the far end closed is never handed out");

        let pool = Pool::new(8, Duration::from_millis(20));
        pool.give_back(sender().await);
        assert_eq!(settle(&pool, 1).await, 1);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(pool.take().is_none(), "a connection idle past the timeout is dropped");
        pool.give_back(sender().await);
        assert_eq!(settle(&pool, 1).await, 1);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(pool.idle(), 0, "the reaper drops it without a take");
    }
}
