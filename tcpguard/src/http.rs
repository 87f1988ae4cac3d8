//! The metrics endpoint: a small HTTP/1.1 server with two routes, `/metrics` and `/healthz`.
//! Connections are kept alive between requests (Prometheus reuses its connection from scrape
//! to scrape) until the client closes them, asks to, or stays silent for a while.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use log::{debug, warn};
use prometheus::Registry;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use crate::metrics::{CONTENT_TYPE, encode};

/// Longest a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a kept-alive connection may stay silent between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request head read.
const MAX_REQUEST: usize = 8192;
/// How stale the daemon's heartbeat may be before /healthz says it is unhealthy.
const HEALTHY_WITHIN_SECS: u64 = 10;

/// The daemon's heartbeat: seconds on the monotonic clock of its last pass through its loop.
pub type Heartbeat = Arc<AtomicU64>;

/// Serves until the listener fails.
pub async fn serve(listener: TcpListener, registry: Registry, heartbeat: Heartbeat) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let registry = registry.clone();
                let heartbeat = heartbeat.clone();
                tokio::spawn(async move {
                    if let Err(err) = answer(stream, &registry, &heartbeat).await {
                        debug!("metrics endpoint: {err}");
                    }
                });
            }
            Err(err) => {
                warn!("metrics endpoint: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(
    mut stream: TcpStream,
    registry: &Registry,
    heartbeat: &Heartbeat,
) -> std::io::Result<()> {
    let mut first = true;
    loop {
        let wait = if first { REQUEST_TIMEOUT } else { IDLE_TIMEOUT };
        first = false;
        let head = tokio::time::timeout(wait, read_head(&mut stream))
            .await
            .map_err(|_| std::io::Error::other("no request in time"))??;
        if head.is_empty() {
            return Ok(());
        }
        // HTTP/1.1 keeps connections unless told otherwise; HTTP/1.0 closes them.
        let keep_alive = head
            .lines()
            .next()
            .is_some_and(|line| line.ends_with("HTTP/1.1"))
            && !head
                .lines()
                .any(|line| line.eq_ignore_ascii_case("connection: close"));
        let response = respond(&head, registry, heartbeat, keep_alive);
        stream.write_all(&response).await?;
        if !keep_alive {
            return stream.shutdown().await;
        }
    }
}

fn respond(head: &str, registry: &Registry, heartbeat: &Heartbeat, keep_alive: bool) -> Vec<u8> {
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", CONTENT_TYPE, encode(registry)),
        ("GET" | "HEAD", "/healthz") => {
            let age =
                crate::clock::monotonic_secs().saturating_sub(heartbeat.load(Ordering::Relaxed));
            if age <= HEALTHY_WITHIN_SECS {
                ("200 OK", "text/plain", b"ok\n".to_vec())
            } else {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    format!("event loop stalled for {age} s\n").into_bytes(),
                )
            }
        }
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            b"try /metrics or /healthz\n".to_vec(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            b"only GET\n".to_vec(),
        ),
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(&body);
    }
    response
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buffer.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..read]);
        if buffer.len() > MAX_REQUEST {
            return Err(std::io::Error::other("request head too large"));
        }
    }
    Ok(String::from_utf8_lossy(&buffer).into_owned())
}
