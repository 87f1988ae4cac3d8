//! `cookies = "under-attack"` against the kernel's ground truth: below the threshold a SYN
//! gets the kernel's normal handshake (its exact MSS, which no cookie can carry) and no cookie
//! is sent; a bounded flood above it switches to cookies while clients keep connecting, and
//! back once it stops; a rate hovering at the threshold switches once. Real daemon, kernel
//! clients, network namespaces.

use std::{
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tcpguard_common::tcp_flags::SYN;

use tcpguard_tests::{
    netns::Namespace,
    observe::{Negotiated, flows, negotiated, status, wait_until},
    raw::{RawTcp, Segment},
    rig::{CLIENT, CLIENT_IF, Daemon, Flood, Rig, SERVER, SERVER_IF, kernel_counters},
};

const PROTECTED: u16 = 8080;
const UNPROTECTED: u16 = 9090;
/// The threshold the tests run with: 200 SYN/s, an attack over after 1 s below 100 SYN/s.
const SYN_RATE: u64 = 200;
/// An MSS no cookie table holds: a cookie rounds it down (to 536 for IPv4).
const ODD_MSS: u16 = 1000;

/// A configuration file for the test's thresholds, removed when dropped.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(namespace: &Namespace) -> Self {
        let path = PathBuf::from(format!(
            "/run/tcpguard-tests/{}-attack.toml",
            namespace.name
        ));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            format!("[attack]\nsyn_rate = {SYN_RATE}\nend_after = 1\n"),
        )
        .unwrap();
        Self(path)
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What the server's kernel negotiated for each connection it accepted, by port.
type Seen = Arc<std::sync::Mutex<Vec<(u16, Negotiated)>>>;

/// The rig, with listeners on both ports that record the server's TCP_INFO of each
/// connection, and a client route that offers [`ODD_MSS`].
fn served_rig() -> (Rig, Arc<AtomicBool>, Seen) {
    let rig = Rig::new();
    rig.client.run(
        "ip",
        &[
            "route",
            "change",
            "10.201.0.0/24",
            "dev",
            CLIENT_IF,
            "advmss",
            &ODD_MSS.to_string(),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    for port in [PROTECTED, UNPROTECTED] {
        let (stop, seen) = (stop.clone(), seen.clone());
        let (ready_tx, ready) = std::sync::mpsc::channel();
        rig.server.spawn(move || {
            let listener = TcpListener::bind(("0.0.0.0", port)).expect("listening");
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => seen.lock().unwrap().push((port, negotiated(&stream))),
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        ready.recv().expect("server started");
    }
    (rig, stop, seen)
}

fn start(rig: &Rig, config: &ConfigFile) -> Daemon {
    Daemon::start(
        &rig.server,
        &[
            "--config",
            config.0.to_str().unwrap(),
            "--iface",
            SERVER_IF,
            "--port",
            "8080",
            "--cookie-mode",
            "own",
            "--cookies",
            "under-attack",
        ],
    )
}

/// One connection to `port`; what the server's kernel negotiated for it.
fn connect(rig: &Rig, seen: &Seen, port: u16) -> Negotiated {
    let before = seen.lock().unwrap().len();
    let stream = rig.client.within(move || {
        TcpStream::connect_timeout(&SocketAddr::from((SERVER, port)), Duration::from_secs(5))
            .unwrap_or_else(|err| panic!("connect to port {port}: {err}"))
    });
    let mss = wait_until(Duration::from_secs(5), "the server accepts", || {
        seen.lock().unwrap()[before..]
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, info)| *info)
    });
    drop(stream);
    mss
}

fn counter(paths: &tcpguard_tests::rig::DaemonPaths, name: &str) -> u64 {
    status(paths)["packets"][name].as_u64().unwrap_or(0)
}

/// Whether this kernel has `bpf_sk_assign_tcp_reqsk`; says so when a test is skipped.
fn own_cookies_possible() -> bool {
    let possible = tcpguard::reqsk::kfunc_available();
    if !possible {
        eprintln!("skipped: under-attack mode needs own cookies (Linux 6.9+)");
    }
    possible
}

#[test]
fn below_the_threshold_the_kernel_answers_with_its_normal_handshake() {
    if !own_cookies_possible() {
        return;
    }
    let (rig, stop, seen) = served_rig();
    let config = ConfigFile::new(&rig.server);
    let daemon = start(&rig, &config);
    let kernel_before = kernel_counters(&rig.server);
    for _ in 0..5 {
        let alone = connect(&rig, &seen, UNPROTECTED);
        let guarded = connect(&rig, &seen, PROTECTED);
        assert_eq!(
            guarded, alone,
            "the protected port's options, window scales and MSS are the kernel's own"
        );
        // With timestamps, the MSS the server sends with is the offer less their 12 bytes: a
        // cookie would have rounded the offer down to 536.
        assert_eq!(alone.snd_mss, u32::from(ODD_MSS) - 12);
    }
    let kernel_after = kernel_counters(&rig.server);
    let status = status(&daemon.paths);
    assert_eq!(status["cookies"], "under-attack");
    assert_eq!(status["under_attack"], false);
    assert_eq!(
        counter(&daemon.paths, "syn_cookie_sent"),
        0,
        "no cookie sent"
    );
    assert_eq!(counter(&daemon.paths, "syn_no_attack"), 5);
    assert_eq!(counter(&daemon.paths, "kernel_handshake"), 5);
    assert_eq!(
        kernel_after.get("TcpExtSyncookiesSent"),
        kernel_before.get("TcpExtSyncookiesSent"),
        "nor by the kernel"
    );
    // The state machine follows them from the ACK that completed the kernel's handshake.
    let tracked = wait_until(Duration::from_secs(5), "the connections tracked", || {
        let list = flows(&daemon.paths);
        let kernel = list
            .iter()
            .filter(|flow| flow["origin"] == "kernel")
            .count();
        (kernel == 5).then_some(kernel)
    });
    assert_eq!(tracked, 5);
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn a_flood_switches_to_cookies_and_back_while_clients_connect() {
    if !own_cookies_possible() {
        return;
    }
    let (rig, stop, seen) = served_rig();
    let config = ConfigFile::new(&rig.server);
    let mut daemon = start(&rig, &config);

    // A client connecting every 20 ms throughout: before, during and after the flood.
    let clients_stop = Arc::new(AtomicBool::new(false));
    let (connected, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients = {
        let (clients_stop, connected, failed) =
            (clients_stop.clone(), connected.clone(), failed.clone());
        rig.client.spawn(move || {
            while !clients_stop.load(Ordering::Relaxed) {
                match TcpStream::connect_timeout(
                    &SocketAddr::from((SERVER, PROTECTED)),
                    Duration::from_secs(3),
                ) {
                    Ok(_) => connected.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    thread::sleep(Duration::from_millis(500));
    assert_eq!(counter(&daemon.paths, "syn_cookie_sent"), 0);

    let flood = Flood::start(&rig.client, &["-S", "--rand-source"], PROTECTED, 4, 400_000);
    wait_until(Duration::from_secs(3), "the attack seen", || {
        (status(&daemon.paths)["under_attack"] == true).then_some(())
    });
    let started = daemon.wait_for("SYN flood:", Duration::from_secs(3));
    eprintln!("{started}");
    // The data plane's own line, through aya-log, the moment its SYN counting decided.
    let decided = logged(&mut daemon, "XDP: attack started at");
    assert!(
        decided.contains(" INFO ") && decided.contains(" tcpguard::rare] "),
        "the data plane's line, at info: {decided}"
    );
    wait_until(Duration::from_secs(3), "cookies sent", || {
        (counter(&daemon.paths, "syn_cookie_sent") > 0).then_some(())
    });
    flood.wait();

    let ended = daemon.wait_for("SYN flood over", Duration::from_secs(10));
    eprintln!("{ended}");
    // The clients' SYNs keep the data plane's windows rolling, so it decides the end too.
    let decided = logged(&mut daemon, "XDP: attack over");
    assert!(
        decided.contains(" INFO ") && decided.contains(" tcpguard::rare] "),
        "the data plane's line, at info: {decided}"
    );
    assert_eq!(status(&daemon.paths)["under_attack"], false);
    let cookies_after_flood = counter(&daemon.paths, "syn_cookie_sent");
    // The clients stop first: `connect` takes the server's first new connection to the port,
    // which could be one of theirs, closed by the time the server reads it (CLOSE-WAIT).
    clients_stop.store(true, Ordering::Relaxed);
    clients.join().unwrap();
    // The kernel's handshake again: its exact MSS, and no cookie.
    assert_eq!(
        connect(&rig, &seen, PROTECTED),
        connect(&rig, &seen, UNPROTECTED)
    );
    assert_eq!(
        counter(&daemon.paths, "syn_cookie_sent"),
        cookies_after_flood
    );
    assert_eq!(status(&daemon.paths)["attacks"], 1);
    let (connected, failed) = (
        connected.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    eprintln!("clients: {connected} connected, {failed} failed");
    assert!(connected > 100, "{connected} connections");
    assert_eq!(failed, 0, "every client connected through the switches");
    stop.store(true, Ordering::Relaxed);
}

/// The line with `text` the daemon logged, already or within 3 s: the data plane's lines may
/// come before or after the daemon's own about the same change.
fn logged(daemon: &mut Daemon, text: &str) -> String {
    match daemon.log.iter().find(|line| line.contains(text)) {
        Some(line) => line.clone(),
        None => daemon.wait_for(text, Duration::from_secs(3)),
    }
}

#[test]
fn a_rate_hovering_at_the_threshold_switches_once() {
    if !own_cookies_possible() {
        return;
    }
    let (rig, stop, _seen) = served_rig();
    let config = ConfigFile::new(&rig.server);
    let mut daemon = start(&rig, &config);
    // 300 SYN/s (above 200) and 150 SYN/s (below it, above half of it), a second each, three
    // times over, paced evenly: one attack, which lasts until the SYNs stop.
    rig.client.within(|| {
        let raw = RawTcp::open();
        let start = Instant::now();
        let mut sent: u32 = 0;
        let mut due = Duration::ZERO;
        for _ in 0..3 {
            for rate in [300u32, 150] {
                for _ in 0..rate {
                    due += Duration::from_secs(1) / rate;
                    thread::sleep((start + due).saturating_duration_since(Instant::now()));
                    sent += 1;
                    raw.send(&Segment {
                        source: SocketAddrV4::new(CLIENT, 20_000 + (sent % 40_000) as u16),
                        destination: SocketAddrV4::new(SERVER, PROTECTED),
                        seq: sent.wrapping_mul(2_654_435_761),
                        ack: 0,
                        flags: SYN,
                        options: Vec::new(),
                        payload: Vec::new(),
                    });
                }
            }
        }
    });
    assert_eq!(status(&daemon.paths)["under_attack"], true);
    daemon.wait_for("SYN flood over", Duration::from_secs(10));
    assert_eq!(status(&daemon.paths)["attacks"], 1, "one switch each way");
    let starts = daemon
        .log
        .iter()
        .filter(|line| line.contains("SYN flood:"))
        .count();
    assert_eq!(starts, 1, "{:?}", daemon.log);
    let decided = daemon
        .log
        .iter()
        .filter(|line| line.contains("XDP: attack started at"))
        .count();
    // Two CPUs that roll the same window can both log its change (see tcpguard_common::attack).
    assert!(
        (1..=2).contains(&decided),
        "the data plane decided once (or twice, from two CPUs at once): {:?}",
        daemon.log
    );
    stop.store(true, Ordering::Relaxed);
}
