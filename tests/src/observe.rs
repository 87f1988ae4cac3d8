//! What an operator sees of a running daemon: `tcpguard status` and `tcpguard flows` (JSON),
//! and /metrics, scraped over HTTP and read by the Prometheus project's own text parser.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{netns::Namespace, rig::DaemonPaths};

/// Where the daemon serves metrics by default, inside its network namespace.
pub const METRICS_ADDRESS: &str = "127.0.0.1:9877";

/// `tcpguard status --json`.
pub fn status(paths: &DaemonPaths) -> Value {
    json(paths, "status")
}

/// `tcpguard flows --json`.
pub fn flows(paths: &DaemonPaths) -> Vec<Value> {
    match json(paths, "flows") {
        Value::Array(flows) => flows,
        other => panic!("flows is not a list: {other}"),
    }
}

fn json(paths: &DaemonPaths, command: &str) -> Value {
    let output = paths.tcpguard(&[command, "--json"]);
    assert!(
        output.status.success(),
        "tcpguard {command} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "tcpguard {command} --json printed no JSON ({err}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// An HTTP GET of `path` on the daemon's endpoint in `namespace`: status code and body.
pub fn http_get(namespace: &Namespace, path: &str) -> (u16, String) {
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {METRICS_ADDRESS}\r\nConnection: close\r\n\r\n");
    namespace.within(move || {
        let mut stream = TcpStream::connect(METRICS_ADDRESS).expect("connecting to /metrics");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let code = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        (code, body)
    })
}

/// Every sample of /metrics, keyed `name{label="value",...}` with labels sorted, as parsed by
/// `prometheus_client.parser` (installed by `cargo xtask setup`).
pub fn scrape(namespace: &Namespace) -> BTreeMap<String, f64> {
    let (code, body) = http_get(namespace, "/metrics");
    assert_eq!(code, 200, "/metrics answered {code}: {body}");
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
samples = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        samples["%s{%s}" % (s.name, labels)] = s.value
print(json.dumps(samples))
"#;
    let mut parser = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running python3");
    parser
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let output = parser.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Prometheus text parser refused /metrics: {}\n{body}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the parser's JSON")
}

/// The sample `name{labels}` (labels as `a="x",b="y"`, sorted), or 0 when absent.
pub fn sample(samples: &BTreeMap<String, f64>, name: &str, labels: &str) -> f64 {
    samples
        .get(&format!("{name}{{{labels}}}"))
        .copied()
        .unwrap_or(0.0)
}

/// Polls `check` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the kernel negotiated for a connection, from TCP_INFO: the ground truth the tests
/// compare tcpguard's connections with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// `tcpi_state` (1: ESTABLISHED).
    pub state: u8,
    /// `tcpi_options`: [`TCPI_OPT_TIMESTAMPS`], [`TCPI_OPT_SACK`], [`TCPI_OPT_WSCALE`],
    /// [`TCPI_OPT_ECN`], and others.
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub snd_mss: u32,
}

pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
pub const TCPI_OPT_SACK: u8 = 2;
pub const TCPI_OPT_WSCALE: u8 = 4;
pub const TCPI_OPT_ECN: u8 = 8;

/// TCP_INFO of `stream`.
pub fn negotiated(stream: &std::net::TcpStream) -> Negotiated {
    use std::os::fd::AsRawFd as _;
    // SAFETY: tcp_info is plain old data.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info has len bytes; the fd is the stream's.
    let status = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(status, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    Negotiated {
        state: info.tcpi_state,
        options: info.tcpi_options,
        snd_wscale: info.tcpi_snd_rcv_wscale & 0x0f,
        rcv_wscale: info.tcpi_snd_rcv_wscale >> 4,
        snd_mss: info.tcpi_snd_mss,
    }
}
