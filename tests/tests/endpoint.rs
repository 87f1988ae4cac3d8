//! The metrics endpoint under abuse: pipelined requests each get their answer, and an
//! unprivileged local user holding thousands of connections to /metrics takes none of the
//! descriptors the daemon needs: `tcpguard status`, a reload and a scrape still answer.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::Stdio,
    time::Duration,
};

use tcpguard_tests::{
    observe::{METRICS_ADDRESS, http_get, status},
    rig::{Daemon, DaemonPaths, Rig, SERVER_IF},
};

#[test]
fn pipelined_requests_each_get_an_answer() {
    let rig = Rig::new();
    let _daemon = Daemon::start(&rig.server, &["--iface", SERVER_IF, "--port", "8080"]);
    let answers = rig.server.within(|| {
        let mut stream = TcpStream::connect(METRICS_ADDRESS).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // Three requests in one write; the last asks to close, so the answer ends there.
        stream
            .write_all(
                b"GET /healthz HTTP/1.1\r\nHost: tcpguard\r\n\r\n\
                  GET /metrics HTTP/1.1\r\nHost: tcpguard\r\n\r\n\
                  GET /healthz HTTP/1.1\r\nHost: tcpguard\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        let mut answers = String::new();
        stream.read_to_string(&mut answers).unwrap();
        answers
    });
    assert_eq!(
        answers.matches("HTTP/1.1 200 OK\r\n").count(),
        3,
        "one answer per request: {}",
        &answers[..answers.len().min(2000)]
    );
    assert!(answers.contains("tcpguard_build_info"));
    assert!(answers.ends_with("ok\n"));
}

/// The attacker: a process that drops to `nobody`, opens connections to /metrics all at once,
/// sends a request on each and never reads the answer, holding them all until its standard
/// input closes. It prints how many it holds and how many connects failed (within 5 s).
const HOLD_CONNECTIONS: &str = r#"
import selectors, socket, sys, time
request = b"GET /metrics HTTP/1.1\r\nHost: tcpguard\r\n\r\n"
waiting = selectors.DefaultSelector()
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("127.0.0.1", 9877))
    waiting.register(s, selectors.EVENT_WRITE)
held, failed = [], 0
deadline = time.monotonic() + 5
while waiting.get_map() and time.monotonic() < deadline:
    for key, _ in waiting.select(timeout=max(0.0, deadline - time.monotonic())):
        s = key.fileobj
        waiting.unregister(s)
        try:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                raise OSError
            s.send(request)
            held.append(s)
        except OSError:
            failed += 1
failed += len(waiting.get_map())
print(len(held), failed, flush=True)
sys.stdin.read()
"#;

fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

#[test]
fn thousands_of_idle_metrics_connections_leave_status_reload_and_scrapes_working() {
    let rig = Rig::new();
    let config = std::env::temp_dir().join(format!("{}.toml", rig.server.name));
    std::fs::write(
        &config,
        "interface = \"srv0\"\nports = [8080]\nstats_interval = 0\n",
    )
    .unwrap();
    // The daemon with today's default descriptor limit, 1,024.
    let mut daemon = Daemon::start_wrapped(
        &rig.server,
        DaemonPaths::for_namespace(&rig.server),
        &["prlimit", "--nofile=1024:1024", "--"],
        &["--config", config.to_str().unwrap()],
        &[],
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let open_files = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files.split_whitespace().nth(3),
        Some("1024"),
        "{open_files}"
    );

    let wanted = 2000;
    let mut attacker = rig
        .server
        .command("prlimit")
        .args([
            "--nofile=8192:8192",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            HOLD_CONNECTIONS,
            &wanted.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the attacker");
    let mut line = String::new();
    BufReader::new(attacker.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let (held, failed): (usize, usize) = {
        let mut counts = line.split_whitespace().map(|n| n.parse().unwrap());
        (counts.next().unwrap(), counts.next().unwrap())
    };
    println!(
        "the attacker holds {held} connections ({failed} connects failed); the daemon has {} descriptors open",
        open_descriptors(daemon.pid())
    );
    // More than the daemon's whole descriptor limit.
    assert!(held > 1024, "{held} held, {failed} failed");

    // While they are held: status, a reload and a scrape.
    let status = status(&daemon.paths);
    assert_eq!(status["ports"], serde_json::json!([8080]));
    std::fs::write(
        &config,
        "interface = \"srv0\"\nports = [8080, 8081]\nstats_interval = 0\n",
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    daemon.wait_for("configuration reloaded", Duration::from_secs(10));
    let (code, body) = http_get(&rig.server, "/metrics");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("tcpguard_config_reloads_total{result=\"success\"} 1"),
        "{body}"
    );
    let descriptors = open_descriptors(daemon.pid());
    assert!(
        descriptors < 400,
        "the daemon holds {descriptors} descriptors: the endpoint's cap does not hold"
    );

    drop(attacker.stdin.take());
    let _ = attacker.kill();
    let _ = attacker.wait();
    let _ = std::fs::remove_file(config);
}
