//! Copying bytes both ways between an upgraded client connection and its upstream, with no frame
//! parsing and no idle timeout.
//!
//! Unlike `tokio::io::copy_bidirectional`, which gives every connection two 8 KiB heap buffers
//! up front, this reads into a buffer on the thread's stack and writes straight on: an idle
//! WebSocket holds no buffer at all, and a busy one allocates only while the other side is slower
//! (the bytes it could not take yet wait in a spill buffer, which goes once it is written out).

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read per call: large enough that a 1 MB message takes a few dozen system calls.
const CHUNK: usize = 64 * 1024;

/// A spill buffer larger than this is freed once written out, not kept for the next time.
const KEEP_SPILL: usize = 16 * 1024;

/// One direction of the copy.
#[derive(Default)]
struct Dir {
    /// Bytes read but not yet written (the writer was not ready).
    spill: Vec<u8>,
    written: usize,
    /// Bytes were written since the last flush (TLS streams buffer them).
    unflushed: bool,
    eof: bool,
    done: bool,
}

impl Dir {
    /// Moves bytes from `r` to `w` until `r` has nothing more for now (Pending) or ends.
    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, r: &mut R, w: &mut W) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            // What the writer could not take last time goes first.
            while self.written < self.spill.len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.spill[self.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.unflushed = true;
            }
            if !self.spill.is_empty() {
                self.spill.clear();
                self.written = 0;
                if self.spill.capacity() > KEEP_SPILL {
                    self.spill = Vec::new();
                }
            }
            if self.eof {
                ready!(Pin::new(&mut *w).poll_flush(cx))?;
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            // Uninitialized: zeroing 64 KiB for every read of a 64-byte message cost more than
            // the read itself (a fifth of the proxy's CPU on small WebSocket messages).
            let mut stack = [const { MaybeUninit::<u8>::uninit() }; CHUNK];
            let mut buf = ReadBuf::uninit(&mut stack);
            match Pin::new(&mut *r).poll_read(cx, &mut buf) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    if self.unflushed {
                        ready!(Pin::new(&mut *w).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
            let data = buf.filled();
            if data.is_empty() {
                self.eof = true;
                continue;
            }
            let mut off = 0;
            while off < data.len() {
                match Pin::new(&mut *w).poll_write(cx, &data[off..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        off += n;
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // The writer will wake us; keep the rest until then.
                        self.spill.extend_from_slice(&data[off..]);
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both sides have ended (each end is passed on as a
/// shutdown of the other's write side), or either fails.
pub async fn both_ways<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ab, mut ba) = (Dir::default(), Dir::default());
    poll_fn(|cx| {
        let x = ab.poll_copy(cx, a, b)?;
        let y = ba.poll_copy(cx, b, a)?;
        if x.is_ready() && y.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_passes_the_end_on() {
        let (mut client, mut near) = tokio::io::duplex(64);
        let (mut far, mut upstream) = tokio::io::duplex(64);
        let task = tokio::spawn(async move { both_ways(&mut near, &mut far).await });
        // Larger than the duplex buffers: the spill path is taken both ways.
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let send = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&send).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big, "client to upstream, and the client's end passed on");
        upstream.write_all(b"reply").await.unwrap();
        upstream.shutdown().await.unwrap();
        drop(upstream);
        assert_eq!(writer.await.unwrap(), b"reply");
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_side_that_is_gone_ends_the_copy_with_an_error() {
        let (mut client, mut near) = tokio::io::duplex(64);
        let (mut far, upstream) = tokio::io::duplex(64);
        drop(upstream);
        client.write_all(b"hello").await.unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), both_ways(&mut near, &mut far)).await;
        assert!(r.expect("no hang").is_err());
    }
}
