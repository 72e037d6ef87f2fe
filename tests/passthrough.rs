//! Pass-through behaviour that a real EG cannot show: bodies streamed (never buffered whole) in both
//! directions, any upgrade (not only WebSocket) spliced byte for byte, and hop-by-hop headers as
//! the upstream receives them. The upstream here is a few lines of raw TCP written for the test.

mod support;

use std::time::Duration;

use support::envgate::Envgate;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Reads one request head (up to the blank line) and returns it.
async fn read_head(r: &mut BufReader<TcpStream>) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap() == 0 || line == "\r\n" {
            return head;
        }
        head.push_str(&line);
    }
}

async fn connect(addr: &str) -> BufReader<TcpStream> {
    BufReader::new(TcpStream::connect(addr).await.unwrap())
}

async fn read_until(r: &mut BufReader<TcpStream>, needle: &str) -> String {
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

#[tokio::test(flavor = "multi_thread")]
async fn any_upgrade_is_spliced_byte_for_byte() {
    let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    let (tx, mut heads) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (s, _) = up.accept().await.unwrap();
        let mut r = BufReader::new(s);
        tx.send(read_head(&mut r).await).unwrap();
        r.get_mut()
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo/1\r\nConnection: Upgrade\r\nX-Proto: yes\r\n\r\n",
            )
            .await
            .unwrap();
        // Echo every byte back, including ones that look like HTTP.
        let mut buf = [0u8; 1024];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            r.get_mut().write_all(&buf[..n]).await.unwrap();
        }
    });
    let gate = Envgate::start(&format!("http://{up_addr}"), &[]);
    let mut c = connect(&gate.addr).await;
    c.get_mut()
        .write_all(b"GET /custom HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo/1\r\nX-Hop: 1\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut c, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: echo/1"), "{head}");
    assert!(head.contains("x-proto: yes"), "{head}");
    let sent = heads.recv().await.unwrap().to_ascii_lowercase();
    assert!(sent.contains("upgrade: echo/1") && sent.contains("connection: upgrade"), "{sent}");
    for msg in [&b"hello"[..], b"GET / HTTP/1.1\r\n\r\n", &[0u8, 255, 1, 254]] {
        c.get_mut().write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, msg);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_are_streamed_both_ways() {
    let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = up.local_addr().unwrap();
    let (saw_first_chunk, mut first_chunk) = mpsc::unbounded_channel::<()>();
    let (go_on, mut release) = mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        let (s, _) = up.accept().await.unwrap();
        let mut r = BufReader::new(s);
        let head = read_head(&mut r).await.to_ascii_lowercase();
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        // The first chunk arrives while the client is still sending.
        read_until(&mut r, "first-part").await;
        saw_first_chunk.send(()).unwrap();
        read_until(&mut r, "0\r\n\r\n").await;
        // Answer in two parts, the second only when the test says so.
        r.get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nanswer-one\n\r\n")
            .await
            .unwrap();
        release.recv().await.unwrap();
        r.get_mut().write_all(b"b\r\nanswer-two\n\r\n0\r\n\r\n").await.unwrap();
    });
    let gate = Envgate::start(&format!("http://{up_addr}"), &[]);
    let mut c = connect(&gate.addr).await;
    c.get_mut()
        .write_all(b"PUT /api/contents/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\na\r\nfirst-part\r\n")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), first_chunk.recv())
        .await
        .expect("the upstream got the first chunk before the body ended")
        .unwrap();
    c.get_mut().write_all(b"b\r\nsecond-part\r\n0\r\n\r\n").await.unwrap();
    let got = read_until(&mut c, "answer-one").await;
    assert!(!got.contains("answer-two"), "{got}");
    go_on.send(()).unwrap();
    read_until(&mut c, "answer-two").await;
}
