//! The control socket: `tcpguard status` and `tcpguard flows` ask the running daemon over a
//! Unix socket. A request is one line (`status` or `flows`); the answer is one JSON document,
//! after which the daemon closes the connection.

use std::{
    io::{self, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use log::debug;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

/// What a client may ask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Status,
    Flows,
}

/// A request on its way to the daemon's loop, with where the JSON answer goes.
pub type Asked = (Request, oneshot::Sender<String>);

/// `tcpguard status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    pub interface: String,
    pub xdp_mode: String,
    /// The programs were found attached (pinned) and adopted rather than attached anew.
    pub adopted: bool,
    /// "tcx" or "netlink": how the TC egress program is attached.
    #[serde(default)]
    pub tc_attach: String,
    /// Why it is attached so.
    #[serde(default)]
    pub tc_attach_reason: String,
    pub ports: Vec<u16>,
    pub uptime_seconds: u64,
    pub tracked_connections: usize,
    pub flow_capacity: u32,
    /// "CLIENT-STATE/SERVER-STATE" → connections.
    pub connections_by_state: std::collections::BTreeMap<String, usize>,
    /// Every data-plane counter by name.
    pub packets: std::collections::BTreeMap<String, u64>,
    pub events_sent: u64,
    pub events_lost: u64,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub max_connections_per_source: u32,
    /// "own" or "kernel": whose SYN cookies answer.
    pub cookie_mode: String,
    /// Why that path runs.
    pub cookie_mode_reason: String,
    /// Own cookies: what the TC ingress program made of the ACKs XDP accepted, by result.
    #[serde(default)]
    pub cookie_handovers: std::collections::BTreeMap<String, u64>,
    /// "under-attack" or "always": when SYNs get cookies.
    pub cookies: String,
    /// Why.
    pub cookies_reason: String,
    /// Whether the SYN rate says an attack is on.
    pub under_attack: bool,
    /// SYN/s to protected ports in the last window (100 ms) that ended.
    pub syn_rate: u64,
    /// Attacks started since the programs were loaded.
    pub attacks: u64,
}

/// One line of `tcpguard flows`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Flow {
    pub client: String,
    pub server: String,
    pub client_state: String,
    pub server_state: String,
    /// cookie, allowed or adopted.
    pub origin: String,
    pub age_seconds: f64,
    pub idle_seconds: f64,
}

/// Accepts clients until the listener fails, handing each request to the daemon's loop.
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<Asked>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(err) = answer(stream, requests).await {
                debug!("control socket: {err}");
            }
        });
    }
}

async fn answer(stream: tokio::net::UnixStream, requests: mpsc::Sender<Asked>) -> io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(reader, 256));
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| io::Error::other("no request in time"))??;
    let request = match line.trim() {
        "status" => Request::Status,
        "flows" => Request::Flows,
        other => {
            let message =
                format!("{{\"error\":\"unknown request {other:?}; ask status or flows\"}}\n");
            return writer.write_all(message.as_bytes()).await;
        }
    };
    let (reply, answer) = oneshot::channel();
    requests
        .send((request, reply))
        .await
        .map_err(|_| io::Error::other("the daemon is stopping"))?;
    let json = answer
        .await
        .map_err(|_| io::Error::other("the daemon is stopping"))?;
    writer.write_all(json.as_bytes()).await?;
    writer.write_all(b"\n").await?;
    writer.shutdown().await
}

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error(
        "cannot reach tcpguard at {path}: {source} (is the daemon running? `--socket` names another control socket)"
    )]
    Connect { path: String, source: io::Error },
    #[error("tcpguard at {path} answered badly: {source}")]
    Answer { path: String, source: io::Error },
}

/// Asks the daemon listening on `socket`; returns its JSON answer.
pub fn ask(socket: &Path, request: Request) -> Result<String, AskError> {
    let path = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|source| AskError::Connect {
        path: path.clone(),
        source,
    })?;
    let answer_error = |source| AskError::Answer {
        path: path.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(answer_error)?;
    let line: &[u8] = match request {
        Request::Status => b"status\n",
        Request::Flows => b"flows\n",
    };
    stream.write_all(line).map_err(answer_error)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .take(256 << 20)
        .read_to_string(&mut answer)
        .map_err(answer_error)?;
    if answer.trim().is_empty() {
        return Err(answer_error(io::Error::other("empty answer")));
    }
    Ok(answer)
}
