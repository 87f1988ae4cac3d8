//! The data plane's rare events reach the daemon's log, each provoked for real on a real
//! kernel: a lifecycle ring the daemon does not drain (the daemon stopped with SIGSTOP under a
//! flood of SYNs from allow-listed sources, each of which the XDP program reports), and a
//! kfunc that refuses an own-cookie ACK (the server's `tcp_sack` turned off after the daemon
//! read it, so the SYN-ACK agreed to SACK and the kernel refuses a request socket with it).
//! Each line carries its level and addresses; a flood gets no more lines than the limit of one
//! a second per CPU allows. The Rust programs' lines come through aya-log, which logs them with
//! the programs' module as target (`tcpguard::rare`, in env_logger's `[... LEVEL target]`);
//! the C program's come from the daemon's own reader of its ring (`tcpguard::logging`).

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::Duration,
};

use tcpguard_tests::{
    netns::Namespace,
    rig::{CLIENT, Daemon, Rig, SERVER, SERVER_IF, SYN_FLOOD_SOURCES},
};

const PORT: u16 = 8080;

/// A configuration file for the daemon, removed when dropped.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(namespace: &Namespace, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.toml", namespace.name));
        let mut file = std::fs::File::create(&path).expect("writing the config file");
        file.write_all(text.as_bytes())
            .expect("writing the config file");
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temporary path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `tcpguard status --json`, parsed.
fn status(daemon: &Daemon) -> serde_json::Value {
    let output = daemon.paths.tcpguard(&["status", "--json"]);
    assert!(output.status.success(), "tcpguard status: {output:?}");
    serde_json::from_slice(&output.stdout).expect("status is JSON")
}

/// The number after `before` in `line`.
fn number_after(line: &str, before: &str) -> u64 {
    let rest = line
        .split(before)
        .nth(1)
        .unwrap_or_else(|| panic!("no {before:?} in {line:?}"));
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {before:?} in {line:?}"))
}

/// The target aya-log gives the Rust programs' lines: the module that logs them.
const DATA_PLANE_TARGET: &str = " tcpguard::rare] ";

/// Possible CPUs: the per-CPU limits the data plane keeps.
fn cpus() -> u64 {
    u64::from(aya::util::nr_cpus().expect("the possible CPUs").get())
}

#[test]
fn a_full_event_ring_is_logged_with_addresses_at_most_once_a_second_per_cpu() {
    let rig = Rig::new();
    let (network, prefix) = SYN_FLOOD_SOURCES;
    // Every SYN from an allow-listed source starts a tracked flow: one lifecycle event each.
    let config = ConfigFile::new(
        &rig.server,
        &format!("[policy]\nallow = [\"{network}/{prefix}\"]\n"),
    );
    let mut daemon = Daemon::start(
        &rig.server,
        &[
            "--config",
            config.path(),
            "--iface",
            SERVER_IF,
            "--port",
            &PORT.to_string(),
        ],
    );
    // The daemon stops reading the ring; the programs go on writing to it.
    daemon.signal(libc::SIGSTOP);
    let flood = rig.syn_flood(PORT);
    let sent = rig
        .client
        .within(move || flood.run(Duration::from_secs(3), 50_000_000));
    daemon.signal(libc::SIGCONT);
    let sent = sent.expect("running the generator");

    let first = daemon.wait_for("lifecycle event ring full", Duration::from_secs(20));
    assert!(first.contains(" WARN "), "logged as a warning: {first}");
    assert!(
        first.contains(DATA_PLANE_TARGET),
        "logged through aya-log: {first}"
    );
    let client = first
        .split("an event of ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .and_then(|address| address.parse::<Ipv4Addr>().ok())
        .unwrap_or_else(|| panic!("a client address in {first}"));
    let mask = u32::MAX << (32 - prefix);
    assert_eq!(
        u32::from(client) & mask,
        u32::from(network),
        "the client is one of the flood's sources: {first}"
    );
    assert!(
        first.contains(&format!("-> {SERVER}:{PORT}")),
        "the server's address and port: {first}"
    );

    // Every line of the flood was written before the daemon went on; the control socket's
    // answer comes after the loop that logs them, and "totals:" after everything.
    let lost = status(&daemon)["events_lost"]
        .as_u64()
        .expect("events_lost");
    daemon.signal(libc::SIGINT);
    daemon.wait_for("totals:", Duration::from_secs(20));
    let lines: Vec<&String> = daemon
        .log
        .iter()
        .filter(|line| line.contains("lifecycle event ring full"))
        .collect();
    // One line per CPU at the start, then at most one per CPU for each second that began.
    let allowed = cpus() * (sent.seconds.ceil() as u64 + 1);
    eprintln!(
        "{} SYNs in {:.2} s, {lost} events lost, {} lines (at most {allowed})",
        sent.packets,
        sent.seconds,
        lines.len()
    );
    assert!(
        lost > 12_000,
        "a flood of {} SYNs overflows the ring",
        sent.packets
    );
    assert!(
        lines.len() as u64 <= allowed,
        "{} lines for a {:.2} s flood on {} CPUs:\n{}",
        lines.len(),
        sent.seconds,
        cpus(),
        lines
            .iter()
            .map(|line| line.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Each line stands for itself and the events held back before it: never more than were
    // lost.
    let told: u64 = lines.iter().map(|line| 1 + number_after(line, "(")).sum();
    assert!(
        told <= lost,
        "the lines account for {told} lost events, the data plane counted {lost}"
    );
}

#[test]
fn a_refused_own_cookie_ack_is_logged_with_the_kfunc_error_and_addresses() {
    if !tcpguard::reqsk::kfunc_available() {
        eprintln!("skipped: this kernel has no bpf_sk_assign_tcp_reqsk (Linux 6.9+)");
        return;
    }
    let rig = Rig::new();
    let listener = rig
        .server
        .within(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).expect("listening"));
    let mut daemon = Daemon::start(
        &rig.server,
        &[
            "--iface",
            SERVER_IF,
            "--port",
            &PORT.to_string(),
            "--cookie-mode",
            "own",
        ],
    );
    // The daemon read tcp_sack = 1 at start, so its SYN-ACKs agree to SACK; the kfunc now
    // refuses a request socket with SACK (EINVAL).
    rig.server.sysctl("net.ipv4.tcp_sack", "0");
    // The handshake completes (the SYN-ACK comes from XDP); the kernel then answers the ACK
    // it got no connection for with a RST, which connect() may already report.
    let _ = rig.client.within(|| {
        TcpStream::connect_timeout(&SocketAddr::from((SERVER, PORT)), Duration::from_secs(5))
    });
    let line = daemon.wait_for(
        "bpf_sk_assign_tcp_reqsk failed with error -22",
        Duration::from_secs(20),
    );
    assert!(line.contains(" ERROR "), "logged as an error: {line}");
    let client_port = number_after(&line, &format!("own-cookie ACK {CLIENT}:"));
    assert!(
        line.contains(&format!(
            "own-cookie ACK {CLIENT}:{client_port} -> {SERVER}:{PORT}"
        )),
        "the ACK's addresses: {line}"
    );
    assert!(line.contains("Invalid argument"), "{line}");
    let totals = daemon.stop();
    let accepted = totals
        .iter()
        .find(|(name, _)| name == "cookie_accepted")
        .map_or(0, |(_, value)| *value);
    assert!(accepted >= 1, "XDP accepted the cookie: {totals:?}");
    drop(listener);
}

#[test]
fn log_level_hides_the_lines_below_it_and_a_refused_syn_cookie_is_an_error() {
    let rig = Rig::new();
    // Half the flood's sources (10.128.0.0/10) are allow-listed, enough to overflow the ring;
    // the rig's client (10.201.0.2) is not, so its SYN goes to the cookie helper.
    let config = ConfigFile::new(
        &rig.server,
        "log_level = \"error\"\n[policy]\nallow = [\"10.128.0.0/10\"]\n",
    );
    let port = PORT.to_string();
    let args = [
        "--config",
        config.path(),
        "--iface",
        SERVER_IF,
        "--port",
        &port,
        "--cookie-mode",
        "kernel",
    ];
    // Without RUST_LOG, log_level decides; "protecting TCP ports" (info) is not shown, so the
    // control socket says when the daemon is up.
    let paths = tcpguard_tests::rig::DaemonPaths::for_namespace(&rig.server);
    let mut daemon = Daemon::spawn(&rig.server, paths, &[], &args, &[("RUST_LOG", "")]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !daemon.paths.tcpguard(&["status"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "tcpguard did not answer on its control socket; its log:\n{}",
            daemon.drain().join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    daemon.signal(libc::SIGSTOP);
    let flood = rig.syn_flood(PORT);
    let sent = rig
        .client
        .within(move || flood.run(Duration::from_secs(1), 2_000_000));
    daemon.signal(libc::SIGCONT);
    sent.expect("running the generator");
    let lost = status(&daemon)["events_lost"]
        .as_u64()
        .expect("events_lost");
    assert!(lost > 0, "the flood overflowed the ring");

    // The daemon made tcp_syncookies 2 at start (kernel's cookies); at 1 the helper refuses a
    // SYN unless the listener's queue is full (ENOENT), and the SYN goes to the kernel.
    rig.server.sysctl("net.ipv4.tcp_syncookies", "1");
    let listener = rig
        .server
        .within(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).expect("listening"));
    let connected = rig.client.within(|| {
        TcpStream::connect_timeout(&SocketAddr::from((SERVER, PORT)), Duration::from_secs(5))
            .map(|stream| stream.local_addr().expect("the client's address"))
    });
    let client = connected.expect("the kernel answers the SYN the helper refused");
    let line = daemon.wait_for(
        "bpf_tcp_gen_syncookie failed with error -2",
        Duration::from_secs(20),
    );
    assert!(line.contains(" ERROR "), "logged as an error: {line}");
    assert!(
        line.contains(DATA_PLANE_TARGET),
        "logged through aya-log: {line}"
    );
    assert!(
        line.contains(&format!("the SYN {client} -> {SERVER}:{PORT}")),
        "the SYN's addresses ({client} -> {SERVER}:{PORT}): {line}"
    );
    // The ring-full records went into the same ring before this one, and the daemon logs a
    // ring in order: at log_level = "error" their warnings, and every info line, stayed out.
    let shown: Vec<&String> = daemon
        .log
        .iter()
        .filter(|line| line.contains(" WARN ") || line.contains(" INFO "))
        .collect();
    assert!(shown.is_empty(), "lines below error: {shown:?}");
    drop(listener);
}
