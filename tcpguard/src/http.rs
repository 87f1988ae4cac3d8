//! The metrics endpoint: `/metrics` and `/healthz` over HTTP/1.1, served by hyper on the
//! daemon's tokio runtime (keep-alive and pipelining as hyper does them).
//!
//! Whatever its clients do, the endpoint holds at most [`MAX_CONNECTIONS`] descriptors, so that
//! the daemon always has the ones it needs for its control socket, its configuration file and
//! its maps: beyond the cap, the connection that has been quiet longest is closed to make room
//! (a scrape always gets in, and a client that holds connections open only loses its oldest),
//! and a connection quiet for [`IDLE_TIMEOUT`] is closed.

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, Version,
    body::Incoming,
    header::{ALLOW, CONNECTION, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, warn};
use prometheus::Registry;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Notify,
};

use crate::{clock::monotonic_ns, metrics};

/// Most connections served at once. Prometheus keeps one per target; the cap leaves the
/// daemon most of a default 1,024-descriptor limit.
pub const MAX_CONNECTIONS: usize = 128;
/// Longest a connection may stay without a byte in either direction: between keep-alive
/// requests, or a client that neither sends its request nor reads its answer.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a client may take to send a request's head once it has started.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How stale the daemon's heartbeat may be before /healthz says it is unhealthy.
const HEALTHY_WITHIN_SECS: u64 = 10;

/// The daemon's heartbeat: seconds on the monotonic clock of its last pass through its loop.
pub type Heartbeat = Arc<AtomicU64>;

/// Serves until the listener fails.
pub async fn serve(listener: TcpListener, registry: Registry, heartbeat: Heartbeat) {
    let connections = Arc::new(Mutex::new(Connections::default()));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                warn!("metrics endpoint: accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let connection = connections
            .lock()
            .expect("the connection table is never poisoned")
            .admit();
        let (registry, heartbeat, connections) =
            (registry.clone(), heartbeat.clone(), connections.clone());
        tokio::spawn(async move {
            if let Err(err) = answer(stream, &connection, registry, heartbeat).await {
                debug!("metrics endpoint: {err}");
            }
            connections
                .lock()
                .expect("the connection table is never poisoned")
                .remove(connection.id);
        });
    }
}

/// One connection's place in the table: when it last moved a byte, and how to close it.
#[derive(Clone)]
struct Connection {
    id: u64,
    last_active_ns: Arc<AtomicU64>,
    close: Arc<Notify>,
}

/// The connections being served.
#[derive(Default)]
struct Connections {
    next_id: u64,
    live: Vec<Connection>,
}

impl Connections {
    /// A place for a new connection; at the cap, the quietest one is told to close first.
    fn admit(&mut self) -> Connection {
        if self.live.len() >= MAX_CONNECTIONS
            && let Some(quietest) = (0..self.live.len())
                .min_by_key(|&index| self.live[index].last_active_ns.load(Ordering::Relaxed))
        {
            let evicted = self.live.swap_remove(quietest);
            // notify_one keeps the permit if the connection is not waiting at this moment.
            evicted.close.notify_one();
        }
        self.next_id += 1;
        let connection = Connection {
            id: self.next_id,
            last_active_ns: Arc::new(AtomicU64::new(monotonic_ns())),
            close: Arc::new(Notify::new()),
        };
        self.live.push(connection.clone());
        connection
    }

    fn remove(&mut self, id: u64) {
        self.live.retain(|connection| connection.id != id);
    }
}

async fn answer(
    stream: TcpStream,
    connection: &Connection,
    registry: Registry,
    heartbeat: Heartbeat,
) -> hyper::Result<()> {
    let io = TokioIo::new(Watched {
        stream,
        last_active_ns: connection.last_active_ns.clone(),
    });
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, &registry, &heartbeat);
        async move { Ok::<_, Infallible>(response) }
    });
    let served = http1::Builder::new()
        // Header names as the hand-written server sent them, for clients that read them so.
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .serve_connection(io, service);
    tokio::pin!(served);
    loop {
        let quiet_since = connection.last_active_ns.load(Ordering::Relaxed);
        let quiet_for = Duration::from_nanos(monotonic_ns().saturating_sub(quiet_since));
        tokio::select! {
            result = served.as_mut() => return result,
            () = connection.close.notified() => return Ok(()),
            () = tokio::time::sleep(IDLE_TIMEOUT.saturating_sub(quiet_for)) => {
                let quiet_since_then = connection.last_active_ns.load(Ordering::Relaxed);
                if quiet_since_then == quiet_since {
                    return Ok(());
                }
            }
        }
    }
}

/// The answer to `request`, saying `Connection: keep-alive` where the connection stays open
/// (hyper adds `Connection: close` where it does not).
fn respond(
    request: &Request<Incoming>,
    registry: &Registry,
    heartbeat: &Heartbeat,
) -> Response<Full<Bytes>> {
    let mut response = answer_to(request, registry, heartbeat);
    let asks_to_close = request.headers().get_all(CONNECTION).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|value| value.eq_ignore_ascii_case("close"))
    });
    if request.version() == Version::HTTP_11 && !asks_to_close {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    response
}

fn answer_to(
    request: &Request<Incoming>,
    registry: &Registry,
    heartbeat: &Heartbeat,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(metrics::encode(registry))));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            response
        }
        "/healthz" => {
            let age =
                crate::clock::monotonic_secs().saturating_sub(heartbeat.load(Ordering::Relaxed));
            if age <= HEALTHY_WITHIN_SECS {
                text(StatusCode::OK, "ok\n".to_owned())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("event loop stalled for {age} s\n"),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "try /metrics or /healthz\n".to_owned(),
        ),
    }
}

/// A connection's stream that notes when it last moved a byte.
struct Watched {
    stream: TcpStream,
    last_active_ns: Arc<AtomicU64>,
}

impl Watched {
    fn moved<T>(&self, poll: Poll<io::Result<T>>, bytes: usize) -> Poll<io::Result<T>> {
        if matches!(poll, Poll::Ready(Ok(_))) && bytes > 0 {
            self.last_active_ns.store(monotonic_ns(), Ordering::Relaxed);
        }
        poll
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.moved(poll, read)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        let written = match &poll {
            Poll::Ready(Ok(written)) => *written,
            _ => 0,
        };
        self.moved(poll, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        let written = match &poll {
            Poll::Ready(Ok(written)) => *written,
            _ => 0,
        };
        self.moved(poll, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
