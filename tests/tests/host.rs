//! tcpguard answers only what the host itself would answer: traffic forwarded through a
//! protected host reaches the machine behind it, with and without a flood, and addresses that
//! appear while tcpguard runs are protected once they are there. Real daemon, real kernel
//! clients and servers, in network namespaces.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use tcpguard_tests::{
    netns::Namespace,
    rig::{CLIENT_IF, Daemon, Flood, Rig, SERVER, SERVER_IF, cookie_connections, kernel_counters},
};

const PORT: u16 = 8080;
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);
const ROUTER_INSIDE: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 1);
/// An address given to the protected interface while tcpguard runs.
const ADDED: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 77);

/// Answers every connection on `port` in `namespace` with `mark`, one byte, until `stop`.
fn serve(namespace: &Namespace, mark: u8, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let handle = namespace.spawn(move || {
        let listener = TcpListener::bind(("0.0.0.0", PORT)).expect("listening");
        listener.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    let mut byte = [0u8; 1];
                    if stream.read_exact(&mut byte).is_ok() {
                        let _ = stream.write_all(&[mark]);
                    }
                }
                Err(_) => thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    ready.recv().expect("server started");
    handle
}

/// Connects from the client to `address`, sends a byte and returns the server's mark.
fn fetch(rig: &Rig, address: Ipv4Addr) -> Result<u8, String> {
    rig.client.within(move || {
        let mut stream =
            TcpStream::connect_timeout(&SocketAddr::from((address, PORT)), Duration::from_secs(5))
                .map_err(|err| format!("connect to {address}: {err}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
            .write_all(b"?")
            .map_err(|err| format!("write: {err}"))?;
        let mut mark = [0u8; 1];
        stream
            .read_exact(&mut mark)
            .map_err(|err| format!("read from {address}: {err}"))?;
        stream.shutdown(Shutdown::Both).ok();
        Ok(mark[0])
    })
}

fn total(totals: &[(String, u64)], name: &str) -> u64 {
    totals
        .iter()
        .find(|(counter, _)| counter == name)
        .map_or(0, |(_, value)| *value)
}

/// The rig's server namespace becomes a router with a backend namespace behind it.
fn backend_behind(rig: &Rig) -> Namespace {
    let backend = Namespace::new("bck");
    rig.server.run(
        "ip",
        &[
            "link",
            "add",
            "rtr0",
            "type",
            "veth",
            "peer",
            "name",
            "bck0",
            "netns",
            &backend.name,
        ],
    );
    for (namespace, interface, address) in [
        (&rig.server, "rtr0", ROUTER_INSIDE),
        (&backend, "bck0", BACKEND),
    ] {
        namespace.run(
            "ip",
            &["addr", "add", &format!("{address}/24"), "dev", interface],
        );
        namespace.run("ip", &["link", "set", interface, "up"]);
        // Forwarded segments cross two veths and XDP; they must carry full checksums.
        namespace.run("ethtool", &["-K", interface, "tx", "off"]);
    }
    backend.run(
        "ip",
        &["route", "add", "default", "via", &ROUTER_INSIDE.to_string()],
    );
    rig.client.run(
        "ip",
        &[
            "route",
            "add",
            "10.202.0.0/24",
            "via",
            &SERVER.to_string(),
            "dev",
            CLIENT_IF,
        ],
    );
    rig.server.sysctl("net.ipv4.ip_forward", "1");
    backend
}

#[test]
fn forwarded_traffic_reaches_the_machine_behind_a_protected_host() {
    let rig = Rig::new();
    let backend = backend_behind(&rig);
    let stop = Arc::new(AtomicBool::new(false));
    // The router listens on the same port on every address: the case where a listener lookup
    // that ignores the destination address would answer for the backend.
    let router_server = serve(&rig.server, b'R', stop.clone());
    let backend_server = serve(&backend, b'B', stop.clone());
    assert_eq!(fetch(&rig, BACKEND), Ok(b'B'), "without tcpguard");

    let daemon = Daemon::start(&rig.server, &["--iface", SERVER_IF, "--port", "8080"]);
    for attempt in 1..=10 {
        assert_eq!(
            fetch(&rig, BACKEND),
            Ok(b'B'),
            "attempt {attempt} through tcpguard"
        );
    }
    assert_eq!(fetch(&rig, SERVER), Ok(b'R'), "the router's own service");

    let before = kernel_counters(&rig.server);
    let flood = Flood::start(&rig.client, &["-S", "--rand-source"], PORT, 20, 2_000_000);
    thread::sleep(Duration::from_secs(1));
    for attempt in 1..=20 {
        assert_eq!(
            fetch(&rig, BACKEND),
            Ok(b'B'),
            "attempt {attempt} during a flood at the router"
        );
        assert_eq!(
            fetch(&rig, SERVER),
            Ok(b'R'),
            "attempt {attempt} to the router during the flood"
        );
    }
    drop(flood);
    let after = kernel_counters(&rig.server);
    stop.store(true, Ordering::Relaxed);
    let totals = daemon.stop();
    eprintln!("tcpguard totals: {totals:?}");
    assert!(
        total(&totals, "not_host_address") >= 30,
        "forwarded SYNs passed untouched: {totals:?}"
    );
    assert!(
        total(&totals, "syn_cookie_sent") > 1000,
        "the flood at the router was answered from XDP"
    );
    let kernel_cookies = after.get("TcpExtSyncookiesSent").copied().unwrap_or(0)
        - before.get("TcpExtSyncookiesSent").copied().unwrap_or(0);
    assert_eq!(
        kernel_cookies, 0,
        "the router's kernel made no cookie of its own"
    );
    router_server.join().unwrap();
    backend_server.join().unwrap();
}

#[test]
fn an_address_added_while_tcpguard_runs_is_protected_once_it_is_there() {
    let rig = Rig::new();
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve(&rig.server, b'S', stop.clone());
    let mut daemon = Daemon::start(&rig.server, &["--iface", SERVER_IF, "--port", "8080"]);
    rig.server.run(
        "ip",
        &["addr", "add", &format!("{ADDED}/24"), "dev", SERVER_IF],
    );
    daemon.wait_for(
        &format!("host address {ADDED} appeared"),
        Duration::from_secs(5),
    );
    let before = kernel_counters(&rig.server);
    for attempt in 1..=5 {
        assert_eq!(
            fetch(&rig, ADDED),
            Ok(b'S'),
            "attempt {attempt} to the added address"
        );
    }
    let after = kernel_counters(&rig.server);
    rig.server.run(
        "ip",
        &["addr", "del", &format!("{ADDED}/24"), "dev", SERVER_IF],
    );
    daemon.wait_for(
        &format!("host address {ADDED} went away"),
        Duration::from_secs(5),
    );
    stop.store(true, Ordering::Relaxed);
    let totals = daemon.stop();
    let accepted = cookie_connections(&before, &after, &totals);
    assert!(
        accepted >= 5,
        "each connection came through tcpguard's cookie: {accepted}"
    );
    assert!(total(&totals, "syn_cookie_sent") >= 5, "{totals:?}");
    server.join().unwrap();
}
