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
