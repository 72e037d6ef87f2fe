//! WebSocket load for the benchmark. Prints one JSON line on stdout.
//!
//! ```text
//! wsload rtt  --url ws://H:P/api/kernels/k/channels --conns N --secs S [--size 64]
//!     every connection sends one message and waits for its echo, in a loop, for S seconds;
//!     rate = round trips per second (all connections), p50/p99 of the round trip
//! wsload tput --url URL --secs S [--size 1048576] [--window 4]
//!     one connection, up to WINDOW messages in flight; rate = MB/s echoed (1 MB = 2^20 bytes),
//!     p50/p99 of each message's send-to-echo time
//! wsload idle --url URL --conns N [--hold S] [--pids P1,P2]
//!     opens N connections (each checked with one echo), holds them S seconds idle, and reports
//!     the summed VmRSS of PIDS before and during, and the difference per connection
//! ```
//! Every loop is bounded by its duration; every wait by a timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Args {
    mode: String,
    url: String,
    conns: usize,
    secs: f64,
    size: usize,
    window: usize,
    hold: f64,
    pids: Vec<u32>,
}

fn die(msg: &str) -> ! {
    eprintln!("wsload: {msg}");
    std::process::exit(2)
}

fn num<T: std::str::FromStr>(k: &str, v: &str) -> T {
    v.parse().unwrap_or_else(|_| die(&format!("bad value for {k}: {v}")))
}

fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    let mode = it.next().unwrap_or_else(|| die("usage: wsload rtt|tput|idle --url URL ..."));
    let mut a = Args {
        mode,
        url: String::new(),
        conns: 1,
        secs: 5.0,
        size: 0,
        window: 4,
        hold: 3.0,
        pids: Vec::new(),
    };
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| die(&format!("{k} needs a value")));
        match k.as_str() {
            "--url" => a.url = v.clone(),
            "--conns" => a.conns = num(&k, &v),
            "--secs" => a.secs = num(&k, &v),
            "--size" => a.size = num(&k, &v),
            "--window" => a.window = num(&k, &v),
            "--hold" => a.hold = num(&k, &v),
            "--pids" => {
                a.pids = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| num(&k, s))
                    .collect()
            }
            _ => die(&format!("unknown argument {k}")),
        }
    }
    if a.url.is_empty() {
        die("--url is required");
    }
    if a.size == 0 {
        a.size = if a.mode == "tput" { 1 << 20 } else { 64 };
    }
    a
}

fn main() {
    let a = parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let out = rt.block_on(async {
        match a.mode.as_str() {
            "rtt" => rtt(&a).await,
            "tput" => tput(&a).await,
            "idle" => idle(&a).await,
            m => die(&format!("unknown mode {m}")),
        }
    });
    match out {
        Ok(line) => println!("{line}"),
        Err(e) => die(&e),
    }
}

async fn connect(url: &str) -> Result<Ws, String> {
    let cfg = WebSocketConfig {
        max_message_size: Some(256 << 20),
        max_frame_size: Some(256 << 20),
        ..Default::default()
    };
    let fut = tokio_tungstenite::connect_async_with_config(url, Some(cfg), true);
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(format!("connect {url}: {e}")),
        Err(_) => Err(format!("connect {url}: timeout")),
    }
}

/// One message out, its echo back, bounded by a timeout.
async fn echo(ws: &mut Ws, payload: &[u8]) -> Result<(), String> {
    ws.send(Message::Binary(payload.to_vec())).await.map_err(|e| e.to_string())?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Err(_) => return Err("echo timeout".into()),
            Ok(None) => return Err("closed".into()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(Message::Binary(b)))) if b.len() == payload.len() => return Ok(()),
            Ok(Some(Ok(Message::Binary(_)))) => return Err("echo of the wrong size".into()),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn result(ops: u64, secs: f64, rate: f64, mut lat_ns: Vec<u64>, errors: u64) -> String {
    lat_ns.sort_unstable();
    format!(
        "{{\"ops\":{ops},\"secs\":{secs:.3},\"rate\":{rate:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"errors\":{errors}}}",
        pct(&lat_ns, 50.0),
        pct(&lat_ns, 99.0)
    )
}

async fn rtt(a: &Args) -> Result<String, String> {
    let mut conns = Vec::with_capacity(a.conns);
    for _ in 0..a.conns {
        conns.push(connect(&a.url).await?);
    }
    let payload: Arc<Vec<u8>> = Arc::new((0..a.size).map(|i| b'a' + (i % 26) as u8).collect());
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.secs);
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut ws| {
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 16);
                let mut errors = 0u64;
                while Instant::now() < end {
                    let t = Instant::now();
                    match echo(&mut ws, &payload).await {
                        Ok(()) => lat.push(t.elapsed().as_nanos() as u64),
                        Err(_) => {
                            errors += 1;
                            break;
                        }
                    }
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                (lat, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.map_err(|e| e.to_string())?;
        all.extend(l);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = all.len() as u64;
    Ok(result(n, secs, n as f64 / secs, all, errors))
}

async fn tput(a: &Args) -> Result<String, String> {
    let ws = connect(&a.url).await?;
    let (mut tx, mut rx) = ws.split();
    let payload: Vec<u8> = (0..a.size).map(|i| (i % 251) as u8).collect();
    let window = Arc::new(Semaphore::new(a.window.max(1)));
    let (ttx, mut trx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let size = a.size;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(a.secs);
    let w = window.clone();
    let writer = tokio::spawn(async move {
        let mut sent = 0u64;
        while Instant::now() < end {
            let Ok(p) = tokio::time::timeout(Duration::from_secs(10), w.acquire()).await else { break };
            p.map_err(|e| e.to_string())?.forget();
            let _ = ttx.send(Instant::now());
            tx.send(Message::Binary(payload.clone())).await.map_err(|e| e.to_string())?;
            sent += 1;
        }
        Ok::<_, String>((sent, tx))
    });
    let mut lat = Vec::new();
    let mut last = start;
    let mut errors = 0u64;
    loop {
        if writer.is_finished() && trx.is_empty() {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => {
                if b.len() != size {
                    return Err("echo of the wrong size".into());
                }
                last = Instant::now();
                if let Ok(t) = trx.try_recv() {
                    lat.push(last.duration_since(t).as_nanos() as u64);
                }
                window.add_permits(1);
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("closed".into()),
            Err(_) => {
                errors += 1;
                break;
            }
        }
    }
    let (sent, mut tx) = writer.await.map_err(|e| e.to_string())??;
    let _ = tokio::time::timeout(Duration::from_secs(1), tx.close()).await;
    let n = lat.len() as u64;
    errors += sent - n;
    let secs = last.duration_since(start).as_secs_f64().max(1e-9);
    let mb = (n * size as u64) as f64 / (1u64 << 20) as f64;
    Ok(result(n, secs, mb / secs, lat, errors))
}

fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

async fn idle(a: &Args) -> Result<String, String> {
    let before = rss_kib(&a.pids);
    let payload = vec![b'x'; a.size.max(1)];
    let start = Instant::now();
    // At most 64 handshakes in flight.
    let gate = Arc::new(Semaphore::new(64));
    let tasks: Vec<_> = (0..a.conns)
        .map(|_| {
            let (gate, url, payload) = (gate.clone(), a.url.clone(), payload.clone());
            tokio::spawn(async move {
                let _p = gate.acquire().await.map_err(|e| e.to_string())?;
                let mut ws = connect(&url).await?;
                echo(&mut ws, &payload).await?;
                Ok::<_, String>(ws)
            })
        })
        .collect();
    let mut held = Vec::with_capacity(a.conns);
    for t in tasks {
        held.push(t.await.map_err(|e| e.to_string())??);
    }
    let open_secs = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
    let during = rss_kib(&a.pids);
    // Still all there?
    let mut alive = 0u64;
    for ws in held.iter_mut().step_by((a.conns / 50).max(1)) {
        if echo(ws, &payload).await.is_ok() {
            alive += 1;
        }
    }
    let per = (during as f64 - before as f64) / a.conns.max(1) as f64;
    drop(held);
    Ok(format!(
        "{{\"conns\":{},\"open_secs\":{open_secs:.2},\"rss_before_kib\":{before},\"rss_during_kib\":{during},\"kib_per_conn\":{per:.2},\"sampled_alive\":{alive}}}",
        a.conns
    ))
}
