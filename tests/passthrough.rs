//! Pass-through behaviour that a real EG cannot show: bodies streamed (never buffered whole) in both
//! directions, any upgrade (not only WebSocket) spliced byte for byte, and hop-by-hop headers as
//! the upstream receives them. The upstreams here are raw TCP (`support::fake_upstream`), written
//! per test.

mod support;

use std::time::Duration;

use support::envgate::Envgate;
use support::fake_upstream::{read_head, read_until, serve_one, switch_and_echo, Conn};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

async fn connect(addr: &str) -> Conn {
    BufReader::new(TcpStream::connect(addr).await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn any_upgrade_is_spliced_byte_for_byte() {
    let (tx, mut heads) = mpsc::unbounded_channel();
    let up_addr = serve_one(|mut r| async move {
        tx.send(read_head(&mut r).await.expect("a request head").text).unwrap();
        // Every byte back, including ones that look like HTTP.
        let switching =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo/1\r\nConnection: Upgrade\r\nX-Proto: yes\r\n\r\n";
        switch_and_echo(&mut r, switching).await;
    })
    .await;
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
    let (saw_first_chunk, mut first_chunk) = mpsc::unbounded_channel::<()>();
    let (go_on, mut release) = mpsc::unbounded_channel::<()>();
    let up_addr = serve_one(|mut r| async move {
        let head = read_head(&mut r).await.expect("a request head").text.to_ascii_lowercase();
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
    })
    .await;
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
