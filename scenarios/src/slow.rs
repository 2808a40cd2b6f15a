//! Clients that hold a connection and do not finish their request (slowloris), and what the node
//! spends on them: many sockets that send half a request header and stall, a wait for the node to
//! close them, and the node's resident memory.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Half a webhook request: the request line and a few headers, never the blank line.
pub const HALF_HEADER: &[u8] =
    b"POST /api/voice/twilio/inbound HTTP/1.1\r\nHost: voxgate.test\r\nContent-Type: application/x-www-form-";

/// Opens `n` connections to `addr`, each sending [`HALF_HEADER`] and then nothing.
pub async fn stall(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(HALF_HEADER).await?;
        out.push(s);
    }
    Ok(out)
}

/// Waits (up to `within`) until the node has closed every connection in `conns` (a read sees
/// the end of the stream or a reset). Returns how many it closed and when the last one closed.
pub async fn wait_closed(conns: Vec<TcpStream>, within: Duration) -> (usize, Duration) {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + within;
    let mut tasks = tokio::task::JoinSet::new();
    for mut c in conns {
        tasks.spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                match tokio::time::timeout_at(deadline, c.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                    // A response (e.g. 408) before the close: keep reading to the end.
                    Ok(Ok(_)) => continue,
                    Err(_) => return None,
                }
            }
        });
    }
    let (mut closed, mut last) = (0, Duration::ZERO);
    while let Some(r) = tasks.join_next().await {
        if let Ok(Some(at)) = r {
            closed += 1;
            last = last.max(at);
        }
    }
    (closed, last)
}

/// A process's resident memory in KiB (Linux `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}
