//! tcpguard's own cookies against the kernel's ground truth: every client keeps the options the
//! kernel alone gives it (TCP_INFO on the server's socket, compared with an unprotected port of
//! the same host in the same run), data crosses both ways intact, and the host's sysctls and
//! unprotected ports are as without tcpguard. Real daemon, kernel clients, network namespaces.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use tcpguard_tests::{
    netns::Namespace,
    observe::{
        Negotiated, TCPI_OPT_ECN, TCPI_OPT_SACK, TCPI_OPT_TIMESTAMPS, TCPI_OPT_WSCALE, negotiated,
    },
    rig::{CLIENT_IF, Daemon, Flood, Rig, SERVER, SERVER_IF, kernel_counters},
};

const PROTECTED: u16 = 8080;
const UNPROTECTED: u16 = 9090;
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 1);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 2);
/// Bytes sent each way per connection.
const TRANSFER: usize = 256 * 1024;
/// The options TCP_INFO reports that a handshake negotiates.
const HANDSHAKE_OPTIONS: u8 = TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE | TCPI_OPT_ECN;

fn pattern(index: usize) -> u8 {
    (index.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// The server's view of each connection, by the client's address and port.
type Seen = Arc<Mutex<Vec<(SocketAddr, Negotiated)>>>;

/// Listens on both ports (IPv4 and IPv6). Each connection: the client's TRANSFER bytes are
/// checked, one byte says whether they arrived intact, then TRANSFER bytes go back.
fn start_server(
    namespace: &Namespace,
    stop: Arc<AtomicBool>,
    seen: Seen,
) -> Vec<thread::JoinHandle<()>> {
    [PROTECTED, UNPROTECTED]
        .into_iter()
        .map(|port| {
            let (stop, seen) = (stop.clone(), seen.clone());
            let (ready_tx, ready) = std::sync::mpsc::channel();
            let handle = namespace.spawn(move || {
                let listener = TcpListener::bind(("::", port)).expect("listening");
                listener.set_nonblocking(true).unwrap();
                ready_tx.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut stream, peer)) = listener.accept() else {
                        thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    stream.set_nonblocking(false).unwrap();
                    seen.lock().unwrap().push((peer, negotiated(&stream)));
                    let mut received = vec![0u8; TRANSFER];
                    if stream.read_exact(&mut received).is_err() {
                        continue;
                    }
                    let intact = received.iter().enumerate().all(|(i, &b)| b == pattern(i));
                    let block: Vec<u8> = (0..TRANSFER).map(pattern).collect();
                    let _ = stream.write_all(&[u8::from(intact)]);
                    let _ = stream.write_all(&block);
                }
            });
            ready.recv().expect("server started");
            handle
        })
        .collect()
}

/// One connection from the client namespace: TRANSFER bytes each way. Returns the client's
/// address, whether the server got the bytes intact, whether the client did.
fn exchange(rig: &Rig, server: SocketAddr) -> (SocketAddr, bool, bool) {
    rig.client.within(move || {
        let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))
            .unwrap_or_else(|err| panic!("connect to {server}: {err}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let block: Vec<u8> = (0..TRANSFER).map(pattern).collect();
        stream.write_all(&block).expect("sending");
        let mut verdict = [0u8; 1];
        stream
            .read_exact(&mut verdict)
            .expect("the server's verdict");
        let mut received = vec![0u8; TRANSFER];
        stream.read_exact(&mut received).expect("receiving");
        let intact = received.iter().enumerate().all(|(i, &b)| b == pattern(i));
        (stream.local_addr().unwrap(), verdict[0] == 1, intact)
    })
}

fn server_view(seen: &Seen, client: SocketAddr) -> Negotiated {
    // The server records TCP_INFO on accept, which may come a moment after connect returns.
    for _ in 0..100 {
        if let Some((_, info)) = seen.lock().unwrap().iter().find(|(peer, _)| {
            peer.port() == client.port() && canonical(peer.ip()) == canonical(client.ip())
        }) {
            return *info;
        }
        thread::sleep(Duration::from_millis(10));
    }
    panic!("the server never saw {client}");
}

fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

fn sysctls(namespace: &Namespace) -> Vec<String> {
    [
        "net.ipv4.tcp_syncookies",
        "net.ipv4.tcp_timestamps",
        "net.ipv4.tcp_sack",
        "net.ipv4.tcp_window_scaling",
        "net.ipv4.tcp_ecn",
    ]
    .iter()
    .map(|name| {
        let out = namespace.run("sysctl", &[name]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    })
    .collect()
}

fn total(totals: &[(String, u64)], name: &str) -> u64 {
    totals
        .iter()
        .find(|(n, _)| n == name)
        .map_or(0, |(_, v)| *v)
}

/// The rig with IPv6 addresses too. (VLANs end to end would need CONFIG_VLAN_8021Q, which this
/// machine's kernel lacks; `xdp_program.rs` covers tagged frames through the XDP program.)
fn rig_with_ipv6() -> Rig {
    let rig = Rig::new();
    for (namespace, interface, address) in [
        (&rig.server, SERVER_IF, SERVER_V6),
        (&rig.client, CLIENT_IF, CLIENT_V6),
    ] {
        namespace.run(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("{address}/64"),
                "dev",
                interface,
                "nodad",
            ],
        );
    }
    rig
}

/// Whether this kernel has `bpf_sk_assign_tcp_reqsk`; says so when a test is skipped.
fn own_cookies_possible() -> bool {
    let possible = tcpguard::reqsk::kfunc_available();
    if !possible {
        eprintln!("skipped: this kernel has no bpf_sk_assign_tcp_reqsk (Linux 6.9+)");
    }
    possible
}

/// The rig with IPv6, and the server on both ports.
fn served_rig() -> (Rig, Arc<AtomicBool>, Seen, Vec<thread::JoinHandle<()>>) {
    let rig = rig_with_ipv6();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Seen::default();
    let servers = start_server(&rig.server, stop.clone(), seen.clone());
    (rig, stop, seen, servers)
}

#[test]
fn every_client_keeps_the_options_the_kernel_alone_gives_it() {
    if !own_cookies_possible() {
        return;
    }
    let (rig, stop, seen, servers) = served_rig();
    let sysctls_before = sysctls(&rig.server);
    let daemon = Daemon::start(
        &rig.server,
        &[
            "--iface",
            SERVER_IF,
            "--port",
            "8080",
            "--cookie-mode",
            "own",
        ],
    );
    assert_eq!(
        sysctls(&rig.server),
        sysctls_before,
        "sysctls untouched at start"
    );
    let before = kernel_counters(&rig.server);

    // Client settings in turn: Linux's default SYN, then without timestamps (Windows' SYN),
    // without window scaling, without SACK, and with ECN asked for.
    let variants: [(&str, &[(&str, &str)]); 5] = [
        ("defaults", &[]),
        ("no timestamps", &[("net.ipv4.tcp_timestamps", "0")]),
        ("no window scaling", &[("net.ipv4.tcp_window_scaling", "0")]),
        ("no SACK", &[("net.ipv4.tcp_sack", "0")]),
        ("ECN", &[("net.ipv4.tcp_ecn", "1")]),
    ];
    let mut through_tcpguard = 0;
    for (what, settings) in variants {
        let defaults = sysctls(&rig.client);
        for (name, value) in settings {
            rig.client.sysctl(name, value);
        }
        for server in [IpAddr::V4(SERVER), IpAddr::V6(SERVER_V6)] {
            let mut views = Vec::new();
            for port in [UNPROTECTED, PROTECTED] {
                let (client, server_got_it, client_got_it) =
                    exchange(&rig, SocketAddr::new(server, port));
                assert!(
                    server_got_it && client_got_it,
                    "{what}, {server}:{port}: transfers intact"
                );
                views.push(server_view(&seen, client));
            }
            let (alone, guarded) = (views[0], views[1]);
            eprintln!("{what}, {server}: kernel alone {alone:?}; through tcpguard {guarded:?}");
            assert_eq!(
                (
                    guarded.options & HANDSHAKE_OPTIONS,
                    guarded.snd_wscale,
                    guarded.rcv_wscale,
                    guarded.snd_mss
                ),
                (
                    alone.options & HANDSHAKE_OPTIONS,
                    alone.snd_wscale,
                    alone.rcv_wscale,
                    alone.snd_mss
                ),
                "{what}, {server}: options, window scales and MSS as the kernel alone negotiates them"
            );
            through_tcpguard += 1;
        }
        // Back to the namespace's defaults.
        for line in defaults {
            if let Some((name, value)) = line.split_once(" = ") {
                rig.client.sysctl(name, value);
            }
        }
    }
    let after = kernel_counters(&rig.server);
    stop.store(true, Ordering::Relaxed);
    let totals = daemon.stop();
    assert_eq!(
        sysctls(&rig.server),
        sysctls_before,
        "sysctls untouched after stop"
    );
    assert!(
        total(&totals, "cookie_accepted") >= through_tcpguard,
        "every protected connection came through an own cookie: {totals:?}"
    );
    for counter in [
        "TcpExtSyncookiesSent",
        "TcpExtSyncookiesRecv",
        "TcpExtSyncookiesFailed",
    ] {
        assert_eq!(
            after.get(counter).copied().unwrap_or(0) - before.get(counter).copied().unwrap_or(0),
            0,
            "{counter}: the kernel's own cookies played no part"
        );
    }
    for server in servers {
        server.join().unwrap();
    }
}

#[test]
fn unprotected_ports_are_as_without_tcpguard_during_a_flood_at_a_protected_one() {
    if !own_cookies_possible() {
        return;
    }
    let (rig, stop, seen, servers) = served_rig();
    // The kernel alone, for reference, on the port that stays unprotected.
    rig.client.sysctl("net.ipv4.tcp_timestamps", "0");
    let (client, ..) = exchange(&rig, SocketAddr::new(IpAddr::V4(SERVER), UNPROTECTED));
    let alone = server_view(&seen, client);
    let daemon = Daemon::start(
        &rig.server,
        &[
            "--iface",
            SERVER_IF,
            "--port",
            "8080",
            "--cookie-mode",
            "own",
        ],
    );
    let before = kernel_counters(&rig.server);
    let flood = Flood::start(
        &rig.client,
        &["-S", "--rand-source"],
        PROTECTED,
        10,
        1_000_000,
    );
    thread::sleep(Duration::from_secs(1));
    for attempt in 1..=10 {
        let (client, server_got_it, client_got_it) =
            exchange(&rig, SocketAddr::new(IpAddr::V4(SERVER), UNPROTECTED));
        assert!(
            server_got_it && client_got_it,
            "attempt {attempt}: transfers intact"
        );
        assert_eq!(
            server_view(&seen, client),
            alone,
            "attempt {attempt}: the unprotected port negotiates as without tcpguard"
        );
    }
    let after = kernel_counters(&rig.server);
    drop(flood);
    stop.store(true, Ordering::Relaxed);
    let totals = daemon.stop();
    assert!(
        total(&totals, "syn_cookie_sent") > 1000,
        "the flood was answered from XDP: {totals:?}"
    );
    assert_eq!(
        after["TcpExtSyncookiesSent"] - before["TcpExtSyncookiesSent"],
        0,
        "the kernel sent no cookie of its own, on any port"
    );
    for server in servers {
        server.join().unwrap();
    }
}

/// A key shared as an operator would share it: one file, the same on every host.
fn shared_secret_file() -> (std::path::PathBuf, String) {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut bytes,
    )
    .unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let path = std::env::temp_dir().join(format!("tcpguard-shared-{}.key", std::process::id()));
    std::fs::write(&path, format!("{hex}\n")).unwrap();
    (path, hex)
}

fn config_with_secret(rig: &Rig, secret: &std::path::Path) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", rig.server.name));
    std::fs::write(
        &path,
        format!(
            "interface = \"{SERVER_IF}\"\nports = [8080]\ncookie_mode = \"own\"\ncookie_secret_file = \"{}\"\n",
            secret.display()
        ),
    )
    .unwrap();
    path
}

/// Two hosts behind one address (ECMP, anycast) sharing a secret file: host A answers the SYN,
/// the client's ACK reaches host B, and B's kernel builds the connection and acknowledges
/// data on it. The secret appears in nothing either daemon shows.
#[test]
fn a_host_sharing_the_secret_completes_a_handshake_another_answered() {
    use tcpguard_common::tcp_flags::{ACK, PSH, SYN};
    use tcpguard_tests::{
        observe::{flows, scrape, status},
        raw::{RawTcp, Segment},
    };
    if !own_cookies_possible() {
        return;
    }
    let (secret, hex) = shared_secret_file();
    let (a, b) = (Rig::new(), Rig::new());
    let (config_a, config_b) = (
        config_with_secret(&a, &secret),
        config_with_secret(&b, &secret),
    );
    let daemon_a = Daemon::start(&a.server, &["--config", config_a.to_str().unwrap()]);
    let daemon_b = Daemon::start(&b.server, &["--config", config_b.to_str().unwrap()]);
    // Both hosts run the service; A's listener is what makes its XDP answer.
    let _listener_a = a
        .server
        .within(|| TcpListener::bind(("0.0.0.0", PROTECTED)).unwrap());
    let listener_b = b
        .server
        .within(|| TcpListener::bind(("0.0.0.0", PROTECTED)).unwrap());

    let client = std::net::SocketAddrV4::new(tcpguard_tests::rig::CLIENT, 40_200);
    let server = std::net::SocketAddrV4::new(SERVER, PROTECTED);
    let client_isn = 0x3000_0000u32;
    // MSS 1460, NOP, window scale 7, NOP, NOP, SACK-permitted: no timestamps.
    let syn_options = vec![2, 4, 0x05, 0xb4, 1, 3, 3, 7, 1, 1, 4, 2];
    let synack = a.client.within(move || {
        let raw = RawTcp::open();
        raw.send(&Segment {
            flags: SYN,
            options: syn_options,
            ..Segment::ack(client, server, client_isn, 0)
        });
        raw.receive(Duration::from_secs(3), |s| {
            s.source == server && s.destination == client && s.flags & (SYN | ACK) == SYN | ACK
        })
    });
    let synack = synack.expect("host A answers the SYN");
    assert_eq!(synack.ack, client_isn + 1);
    let acked = b.client.within(move || {
        let raw = RawTcp::open();
        let (seq, ack) = (client_isn + 1, synack.seq.wrapping_add(1));
        raw.send(&Segment::ack(client, server, seq, ack));
        raw.send(&Segment {
            flags: PSH | ACK,
            payload: b"ping".to_vec(),
            ..Segment::ack(client, server, seq, ack)
        });
        raw.receive(Duration::from_secs(3), |s| {
            s.source == server && s.destination == client && s.ack == seq + 4
        })
    });
    let acked = acked.expect("host B acknowledges the data: it holds the connection");
    assert_eq!(
        acked.seq,
        synack.seq.wrapping_add(1),
        "B continues A's sequence space"
    );
    let accepted = b.server.within(move || {
        listener_b.set_nonblocking(true).unwrap();
        let (mut stream, peer) = listener_b
            .accept()
            .expect("B's listener has the connection");
        let mut data = [0u8; 4];
        stream
            .read_exact(&mut data)
            .expect("the data reached B's application");
        (peer, data)
    });
    assert_eq!(accepted, (std::net::SocketAddr::V4(client), *b"ping"));

    // The secret is in nothing an operator or another user can see.
    let shown = [
        status(&daemon_b.paths).to_string(),
        serde_json::to_string(&flows(&daemon_b.paths)).unwrap(),
        format!("{:?}", scrape(&b.server)),
        daemon_a.log.join("\n"),
        daemon_b.log.join("\n"),
    ];
    for text in &shown {
        assert!(!text.contains(&hex), "the secret leaked: {text}");
    }
    let totals_b = daemon_b.stop();
    let totals_a = daemon_a.stop();
    assert!(total(&totals_a, "syn_cookie_sent") >= 1, "{totals_a:?}");
    assert_eq!(
        total(&totals_b, "syn_cookie_sent"),
        0,
        "B never saw the SYN: {totals_b:?}"
    );
    assert_eq!(total(&totals_b, "cookie_accepted"), 1, "{totals_b:?}");
    for path in [secret, config_a, config_b] {
        let _ = std::fs::remove_file(path);
    }
}
