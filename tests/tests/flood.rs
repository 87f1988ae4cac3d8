//! tcpguard protecting a real server from real floods: two network namespaces joined by veth,
//! the daemon attached in native XDP mode on the server's end, kernel TCP clients and bounded
//! hping3 floods from the client's end. Verdicts come from the kernel's own counters (nstat)
//! and from tcpguard's.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tcpguard_tests::rig::{
    CLIENT, Daemon, Flood, Rig, SERVER, SYN_FLOOD_SOURCES, cookie_connections, kernel_counters,
};

const PORT: u16 = 8080;
const TRANSFER: usize = 10 * 1024 * 1024;

/// A byte pattern that makes a reordered, lost or duplicated block visible.
fn pattern(index: usize) -> u8 {
    (index.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// `tcpi_options` and the window scales byte of TCP_INFO on the server's transfer socket.
type Negotiated = Arc<Mutex<Option<(u8, u8)>>>;

const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;

/// What the kernel negotiated for `stream`, read with TCP_INFO. (`ss -ti` from Debian 12's
/// iproute2 6.1 prints no `ts`/`sack` on this kernel even for plain connections, so the test
/// asks the kernel directly.)
fn negotiated(stream: &TcpStream) -> (u8, u8) {
    let mut info = [0u8; 104];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: info has len bytes; the fd is the stream's.
    let status = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(status, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    (info[5], info[6])
}

/// A server in the rig's server namespace: for each connection, reads a one-byte request, then
/// sends `TRANSFER` bytes for b'T' (recording what was negotiated) or echoes a byte back for
/// anything else. Runs until `stop`.
fn start_server(rig: &Rig, stop: Arc<AtomicBool>, seen: Negotiated) -> thread::JoinHandle<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = rig.server.spawn(move || {
        let listener = TcpListener::bind(("0.0.0.0", PORT)).expect("server listens");
        listener.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    let seen = seen.clone();
                    thread::spawn(move || {
                        let mut request = [0u8; 1];
                        if stream.read_exact(&mut request).is_err() {
                            return;
                        }
                        if request[0] == b'T' {
                            *seen.lock().unwrap() = Some(negotiated(&stream));
                            let block: Vec<u8> = (0..TRANSFER).map(pattern).collect();
                            let _ = stream.write_all(&block);
                            // Held open until the client closes, so that `ss` can see it.
                            let _ = stream.read(&mut request);
                        } else {
                            let _ = stream.write_all(&request);
                        }
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    ready_rx.recv().expect("server started");
    handle
}

/// Opens a connection from the client namespace, sends one byte and waits for the echo.
fn connect_once(rig: &Rig) -> Result<Duration, String> {
    rig.client.within(|| {
        let started = Instant::now();
        let address = SocketAddr::from((SERVER, PORT));
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
            .map_err(|err| format!("connect: {err}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
            .write_all(b"e")
            .map_err(|err| format!("write: {err}"))?;
        let mut echo = [0u8; 1];
        stream
            .read_exact(&mut echo)
            .map_err(|err| format!("read: {err}"))?;
        stream.shutdown(Shutdown::Both).ok();
        Ok(started.elapsed())
    })
}

fn delta(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
    name: &str,
) -> u64 {
    after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
}

fn total(totals: &[(String, u64)], name: &str) -> u64 {
    totals
        .iter()
        .find(|(counter, _)| counter == name)
        .map_or(0, |(_, value)| *value)
}

#[test]
fn clients_connect_and_transfer_through_cookies_with_window_scaling_and_sack() {
    let rig = Rig::new();
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Negotiated::default();
    let server = start_server(&rig, stop.clone(), seen.clone());
    let daemon = Daemon::start(
        &rig.server,
        &["--iface", "srv0", "--port", "8080", "--xdp-mode", "native"],
    );
    assert!(
        daemon
            .log
            .iter()
            .any(|line| line.contains("in native mode")),
        "native XDP on veth: {:?}",
        daemon.log
    );
    let before = kernel_counters(&rig.server);

    for _ in 0..20 {
        connect_once(&rig).expect("a connection without a flood");
    }
    // A 10 MB transfer, checked byte by byte, with the connection held open for `ss`.
    let (client_done_tx, client_done_rx) = std::sync::mpsc::channel::<()>();
    let transfer = rig.client.spawn(move || {
        let mut stream = TcpStream::connect((SERVER, PORT)).expect("connect for transfer");
        stream.write_all(b"T").unwrap();
        let mut received = vec![0u8; TRANSFER];
        stream.read_exact(&mut received).expect("10 MB arrive");
        let corrupt = received
            .iter()
            .enumerate()
            .position(|(i, &byte)| byte != pattern(i));
        client_done_rx.recv().ok();
        corrupt
    });
    let corrupt = {
        client_done_tx.send(()).unwrap();
        transfer.join().unwrap()
    };
    assert_eq!(corrupt, None, "the transfer arrives intact");
    let (options, scales) = seen.lock().unwrap().expect("the server saw the transfer");
    let config = rig
        .server
        .within(|| tcpguard::sysctl::syn_cookie_config().unwrap());
    assert_eq!(
        options & (TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE),
        TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE,
        "timestamps, SACK and window scaling negotiated through the cookie"
    );
    // The low nibble is the server's receive scale: what tcpguard advertised.
    assert_eq!(
        scales >> 4,
        config.window_scale,
        "the kernel's own window scale"
    );
    eprintln!("negotiated: TCP_INFO options {options:#x}, window scales {scales:#x}");

    let after = kernel_counters(&rig.server);
    assert_eq!(delta(&before, &after, "TcpExtSyncookiesSent"), 0);
    stop.store(true, Ordering::Relaxed);
    let totals = daemon.stop();
    assert!(
        cookie_connections(&before, &after, &totals) >= 21,
        "every connection came through a cookie: {totals:?}"
    );
    assert!(total(&totals, "syn_cookie_sent") >= 21, "{totals:?}");
    assert!(total(&totals, "cookie_accepted") >= 21, "{totals:?}");
    server.join().unwrap();
}

#[test]
fn clients_keep_connecting_during_a_syn_flood() {
    let rig = Rig::new();
    let stop = Arc::new(AtomicBool::new(false));
    let server = start_server(&rig, stop.clone(), Negotiated::default());
    let daemon = Daemon::start(&rig.server, &["--iface", "srv0", "--port", "8080"]);
    let before = kernel_counters(&rig.server);

    let flood = Flood::start(&rig.client, &["-S", "--rand-source"], PORT, 20, 3_000_000);
    thread::sleep(Duration::from_secs(1));
    let mut slowest = Duration::ZERO;
    for attempt in 1..=50 {
        let took = connect_once(&rig)
            .unwrap_or_else(|err| panic!("connection {attempt} of 50 during the flood: {err}"));
        slowest = slowest.max(took);
    }
    let syn_recv = rig.server.run("ss", &["-tnH", "state", "syn-recv"]);
    let after = kernel_counters(&rig.server);
    drop(flood);
    eprintln!("50 connections during the SYN flood, slowest {slowest:?}");
    assert!(
        syn_recv.stdout.is_empty(),
        "no SYN-RECV socket on the server: {}",
        String::from_utf8_lossy(&syn_recv.stdout)
    );
    assert_eq!(
        delta(&before, &after, "TcpExtSyncookiesSent"),
        0,
        "the kernel made no cookie of its own"
    );
    assert_eq!(delta(&before, &after, "TcpExtListenOverflows"), 0);

    stop.store(true, Ordering::Relaxed);
    let totals = daemon.stop();
    assert!(
        cookie_connections(&before, &after, &totals) >= 50,
        "every connection came through a cookie: {totals:?}"
    );
    eprintln!("tcpguard totals: {totals:?}");
    assert!(
        total(&totals, "syn_cookie_sent") > 1000,
        "the flood was answered from XDP: {totals:?}"
    );
    server.join().unwrap();
}

#[test]
fn an_ack_flood_is_dropped_in_xdp_and_draws_no_resets() {
    let rig = Rig::new();
    let stop = Arc::new(AtomicBool::new(false));
    let server = start_server(&rig, stop.clone(), Negotiated::default());
    let daemon = Daemon::start(&rig.server, &["--iface", "srv0", "--port", "8080"]);
    connect_once(&rig).expect("a connection before the flood");
    let before = kernel_counters(&rig.server);

    Flood::start(&rig.client, &["-A"], PORT, 5, 200_000).wait();
    let after = kernel_counters(&rig.server);
    connect_once(&rig).expect("a connection after the flood");

    assert_eq!(
        delta(&before, &after, "TcpOutRsts"),
        0,
        "the kernel answered none of the flood with a RST"
    );
    stop.store(true, Ordering::Relaxed);
    let totals = daemon.stop();
    eprintln!("tcpguard totals: {totals:?}");
    assert!(
        total(&totals, "cookie_rejected") > 1000,
        "the flood was dropped in XDP: {totals:?}"
    );
    server.join().unwrap();
}

/// A flood dropped before its time is up (a test failing mid-flood) stops at once: hping3 goes
/// with it, not only the `timeout` that bounds it.
#[test]
fn a_dropped_flood_leaves_no_hping3_behind() {
    let rig = Rig::new();
    let flood = Flood::start(&rig.client, &["-S"], PORT, 30, 1_000);
    std::thread::sleep(Duration::from_millis(500));
    let group = flood.process_group();
    // SAFETY: signal 0 only checks that the group exists.
    assert_eq!(unsafe { libc::kill(-group, 0) }, 0, "the flood is running");
    drop(flood);
    // Killed at once; reaped (hping3 by init, its parent being gone) a moment later.
    let deadline = Instant::now() + Duration::from_secs(3);
    // SAFETY: as above.
    while unsafe { libc::kill(-group, 0) } == 0 {
        let alive: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
            .filter(|stat| {
                let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
                fields.get(2) == Some(&group.to_string().as_str()) && fields.first() != Some(&"Z")
            })
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes of the flood survived its drop: {alive:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The benchmarks' SYN generator sends well-formed SYNs from the sources it is given: the
/// server's kernel, without tcpguard, answers every one with a cookie, and can route each
/// answer back only through the source range.
#[test]
fn the_benchmark_generator_sends_syns_the_kernel_answers() {
    let rig = Rig::new();
    let (network, prefix) = SYN_FLOOD_SOURCES;
    rig.server.run(
        "ip",
        &[
            "route",
            "add",
            &format!("{network}/{prefix}"),
            "via",
            &CLIENT.to_string(),
        ],
    );
    rig.server.sysctl("net.ipv4.tcp_syncookies", "2");
    let listener = rig
        .server
        .within(|| TcpListener::bind(("0.0.0.0", PORT)).unwrap());
    let flood = rig.syn_flood(PORT);
    // Fewer than the veth's queue holds, so that none is dropped before the kernel sees it.
    const SYNS: u64 = 200;
    let before = kernel_counters(&rig.server);
    let sent = rig
        .client
        .within(move || flood.run(Duration::from_secs(5), SYNS))
        .expect("running the generator");
    assert_eq!(sent.packets, SYNS);
    let answered = |counters: &std::collections::HashMap<String, u64>| {
        delta(&before, counters, "TcpExtSyncookiesSent")
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = kernel_counters(&rig.server);
    while answered(&after) < SYNS && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        after = kernel_counters(&rig.server);
    }
    assert_eq!(answered(&after), SYNS, "SYNs answered with a cookie");
    for counter in ["TcpInCsumErrors", "TcpInErrs", "IpOutNoRoutes"] {
        assert_eq!(delta(&before, &after, counter), 0, "{counter}");
    }
    drop(listener);
}
