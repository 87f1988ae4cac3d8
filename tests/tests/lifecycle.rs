//! The daemon follows real connections, between kernel TCP stacks in two network namespaces,
//! through their lifecycles: what `tcpguard flows` shows along the way and what /metrics counts
//! once they are over.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use serde_json::Value;
use tcpguard_tests::{
    observe::{flows, http_get, sample, scrape, status, wait_until},
    rig::{CLIENT, CLIENT_IF, Daemon, Rig, SERVER, SERVER_IF, accept_within, kernel_counters},
};

const PORT: u16 = 8080;

struct Lab {
    rig: Rig,
    daemon: Daemon,
    listener: TcpListener,
    /// The client's address, as connections are made to [`Lab::server`].
    client: IpAddr,
    server: IpAddr,
}

/// [`Lab::new`]'s configuration: TIME-WAIT lasts 2 s instead of 60 s, so that orderly closes
/// finish within the test.
const LAB_CONFIG: &str = "stats_interval = 0\n[timeouts]\nmsl = 1\n";

/// The addresses [`Lab::with_ipv6`] gives the rig's ends.
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 1);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 2);

impl Lab {
    /// TIME-WAIT lasts 2 s instead of 60 s, so that orderly closes finish within the test.
    fn new() -> Self {
        Self::with(LAB_CONFIG, &[])
    }

    /// As [`Lab::new`], with TIME-WAIT lasting 2 × `seconds`.
    fn with_msl(seconds: u32) -> Self {
        Self::with(
            &format!("stats_interval = 0\n[timeouts]\nmsl = {seconds}\n"),
            &[],
        )
    }

    /// As [`Lab::new`], with connections over IPv6: both ends have an address in fd00:201::/64
    /// before the daemon starts, and the server listens on it.
    fn with_ipv6() -> Self {
        let rig = Rig::new();
        for (namespace, interface, address) in [
            (&rig.server, SERVER_IF, SERVER_V6),
            (&rig.client, CLIENT_IF, CLIENT_V6),
        ] {
            let address = format!("{address}/64");
            namespace.run(
                "ip",
                &["-6", "addr", "add", &address, "dev", interface, "nodad"],
            );
        }
        Self::with_rig(
            rig,
            LAB_CONFIG,
            &[],
            (IpAddr::V6(CLIENT_V6), IpAddr::V6(SERVER_V6)),
        )
    }

    /// A daemon with the config file `config` and the extra arguments `args`.
    fn with(config: &str, args: &[&str]) -> Self {
        Self::with_rig(
            Rig::new(),
            config,
            args,
            (IpAddr::V4(CLIENT), IpAddr::V4(SERVER)),
        )
    }

    /// As [`Lab::with`], on `rig`, with connections from `client` to `server`.
    fn with_rig(rig: Rig, config: &str, args: &[&str], (client, server): (IpAddr, IpAddr)) -> Self {
        let path = std::env::temp_dir().join(format!("{}.toml", rig.server.name));
        std::fs::write(&path, config).unwrap();
        let port = PORT.to_string();
        let mut all = vec![
            "--config",
            path.to_str().unwrap(),
            "--iface",
            SERVER_IF,
            "--port",
            &port,
        ];
        all.extend_from_slice(args);
        let daemon = Daemon::start(&rig.server, &all);
        let listener = rig
            .server
            .within(move || TcpListener::bind((server, PORT)).expect("binding the test server"));
        Self {
            rig,
            daemon,
            listener,
            client,
            server,
        }
    }

    /// A connection from the client namespace, and the server's end of it.
    fn connect(&self) -> (TcpStream, TcpStream) {
        let to = SocketAddr::new(self.server, PORT);
        let client = self.rig.client.within(move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .expect("connecting through tcpguard")
        });
        let (server, _) = self.listener.accept().expect("accepting");
        for stream in [&client, &server] {
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
        }
        (client, server)
    }

    /// The tracked flow whose client port is `port`, once `accept` says it is the one.
    fn flow_of(&self, port: u16, what: &str, accept: impl Fn(&str, &str) -> bool) -> Value {
        let client = SocketAddr::new(self.client, port).to_string();
        let mut last = Vec::new();
        for _ in 0..50 {
            last = flows(&self.daemon.paths);
            let found = last.iter().find(|flow| {
                flow["client"].as_str() == Some(client.as_str())
                    && accept(
                        flow["client_state"].as_str().unwrap_or(""),
                        flow["server_state"].as_str().unwrap_or(""),
                    )
            });
            if let Some(flow) = found {
                return flow.clone();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out waiting for {what}; tcpguard flows: {last:#?}");
    }

    fn untracked(&self, port: u16, what: &str) {
        let client = SocketAddr::new(self.client, port).to_string();
        wait_until(Duration::from_secs(10), what, || {
            let gone = !flows(&self.daemon.paths)
                .iter()
                .any(|flow| flow["client"].as_str() == Some(&client));
            gone.then_some(())
        });
    }
}

/// `tcpguard_flow_table_entries` of `family` (`ipv4`, `ipv6`) in scraped `samples`, if exported.
fn flow_table_entries(samples: &BTreeMap<String, f64>, family: &str) -> Option<f64> {
    samples
        .get(&format!(
            "tcpguard_flow_table_entries{{family=\"{family}\"}}"
        ))
        .copied()
}

/// The client closes first after sending a greeting: the client ends in TIME-WAIT, the server
/// in CLOSED.
fn client_close(lab: &Lab, mut client: TcpStream, mut server: TcpStream) {
    let port = client_port(&client);
    client.write_all(b"hello").unwrap();
    let mut hello = [0u8; 5];
    server.read_exact(&mut hello).unwrap();
    drop(client);
    assert!(read_to_end(&mut server).is_empty());
    drop(server);
    lab.flow_of(port, "client TIME-WAIT after a client close", |c, s| {
        (c, s) == ("TIME-WAIT", "CLOSED")
    });
}

fn client_port(stream: &TcpStream) -> u16 {
    stream.local_addr().unwrap().port()
}

fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut data = Vec::new();
    stream.read_to_end(&mut data).expect("reading to EOF");
    data
}

/// SO_LINGER with a zero timeout: close() sends RST instead of FIN.
fn reset_on_close(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .expect("setting SO_LINGER");
}

#[test]
fn lifecycles_end_where_tcp_says_and_are_counted() {
    let lab = Lab::new();

    // Client closes first: the client ends in TIME-WAIT, the server in CLOSED.
    let (client, server) = lab.connect();
    let first = client_port(&client);
    let flow = lab.flow_of(first, "a cookie connection", |c, s| {
        (c, s) == ("ESTABLISHED", "ESTABLISHED")
    });
    assert_eq!(flow["origin"], "cookie");
    client_close(&lab, client, server);

    // Server closes first: the server ends in TIME-WAIT.
    let (mut client, mut server) = lab.connect();
    let second = client_port(&client);
    server.write_all(b"bye").unwrap();
    drop(server);
    assert_eq!(read_to_end(&mut client), b"bye");
    lab.flow_of(
        second,
        "client CLOSE-WAIT after the server's FIN",
        |c, s| (c, s) == ("CLOSE-WAIT", "FIN-WAIT-2"),
    );
    drop(client);
    lab.flow_of(second, "server TIME-WAIT after a server close", |c, s| {
        (c, s) == ("CLOSED", "TIME-WAIT")
    });

    // Half-close: the client is done sending, the server goes on sending, then closes.
    let (mut client, mut server) = lab.connect();
    let third = client_port(&client);
    client.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_end(&mut server).is_empty());
    lab.flow_of(third, "a half-closed connection", |c, s| {
        (c, s) == ("FIN-WAIT-2", "CLOSE-WAIT")
    });
    let payload = vec![7u8; 256 * 1024];
    let sender = std::thread::spawn(move || {
        server.write_all(&payload).unwrap();
        drop(server);
    });
    assert_eq!(read_to_end(&mut client).len(), 256 * 1024);
    sender.join().unwrap();
    lab.flow_of(third, "TIME-WAIT after the half-close", |c, s| {
        (c, s) == ("TIME-WAIT", "CLOSED")
    });
    drop(client);

    // Reset: the client aborts.
    let (mut client, mut server) = lab.connect();
    let fourth = client_port(&client);
    client.write_all(b"abort").unwrap();
    let mut abort = [0u8; 5];
    server.read_exact(&mut abort).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    reset_on_close(&client);
    drop(client);
    lab.untracked(fourth, "the reset connection to be forgotten at once");

    // TIME-WAIT lasts 2·MSL (2 s here), then the orderly closes are over too.
    for port in [first, second, third] {
        lab.untracked(port, "TIME-WAIT to run out");
    }
    let samples = wait_until(Duration::from_secs(5), "metrics of four closes", || {
        let samples = scrape(&lab.rig.server);
        (sample(
            &samples,
            "tcpguard_connections_closed_total",
            "reason=\"rst\"",
        ) >= 1.0)
            .then_some(samples)
    });
    let closed = |reason: &str| {
        sample(
            &samples,
            "tcpguard_connections_closed_total",
            &format!("reason=\"{reason}\""),
        )
    };
    assert_eq!(closed("fin"), 3.0, "{samples:#?}");
    assert_eq!(closed("rst"), 1.0);
    assert_eq!(closed("timeout"), 0.0);
    assert_eq!(
        sample(
            &samples,
            "tcpguard_connections_opened_total",
            "origin=\"cookie\""
        ),
        4.0
    );
    assert_eq!(
        sample(
            &samples,
            "tcpguard_xdp_packets_total",
            "reason=\"syn_cookie_sent\",verdict=\"answer\""
        ),
        4.0
    );
    assert_eq!(
        sample(
            &samples,
            "tcpguard_xdp_packets_total",
            "reason=\"cookie_accepted\",verdict=\"pass\""
        ),
        4.0
    );
    assert!(
        sample(
            &samples,
            "tcpguard_xdp_packets_total",
            "reason=\"tracked_flow\",verdict=\"pass\""
        ) > 0.0
    );
    assert_eq!(
        sample(&samples, "tcpguard_handshake_duration_seconds_count", ""),
        4.0,
        "every handshake timed from its SYN"
    );
    assert_eq!(
        sample(
            &samples,
            "tcpguard_connection_duration_seconds_count",
            "reason=\"fin\""
        ),
        3.0
    );
    for family in ["ipv4", "ipv6"] {
        assert_eq!(flow_table_entries(&samples, family), Some(0.0), "{family}");
    }
    assert_eq!(
        sample(&samples, "tcpguard_lifecycle_events_lost_total", ""),
        0.0
    );
    assert!(sample(&samples, "tcpguard_lifecycle_events_total", "") >= 12.0);
    assert_eq!(
        sample(
            &samples,
            "tcpguard_build_info",
            &format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))
        ),
        1.0
    );

    let (code, body) = http_get(&lab.rig.server, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert_eq!(http_get(&lab.rig.server, "/nothing").0, 404);

    let status = status(&lab.daemon.paths);
    assert_eq!(status["interface"], SERVER_IF);
    assert_eq!(status["ports"], serde_json::json!([PORT]));
    assert_eq!(status["packets"]["cookie_accepted"], 4);
    assert_eq!(status["events_lost"], 0);
}

/// Prometheus keeps its connection from scrape to scrape: so does the endpoint.
#[test]
fn the_metrics_endpoint_keeps_connections_alive() {
    let lab = Lab::new();
    let responses = lab.rig.server.within(|| {
        let mut stream = TcpStream::connect(tcpguard_tests::observe::METRICS_ADDRESS).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut answers = Vec::new();
        for _ in 0..3 {
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: tcpguard\r\n\r\n")
                .unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            let head = String::from_utf8(head).unwrap();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("Content-Length: "))
                .and_then(|length| length.trim().parse().ok())
                .expect("a Content-Length");
            let mut body = vec![0u8; length];
            stream.read_exact(&mut body).unwrap();
            answers.push((head, String::from_utf8(body).unwrap()));
        }
        answers
    });
    for (head, body) in responses {
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(head.contains("Connection: keep-alive"), "{head}");
        assert!(body.contains("tcpguard_build_info"));
    }
}

/// The states the kernel gives the two ends of the connection from the client's `port`, as
/// `ss` lists its sockets in each namespace; a socket it no longer has is CLOSED.
fn kernel_states(lab: &Lab, port: u16) -> (String, String) {
    let client = format!("{CLIENT}:{port}");
    let server = format!("{SERVER}:{PORT}");
    let state = |namespace: &tcpguard_tests::netns::Namespace, local: &str, peer: &str| {
        let output = namespace.run("ss", &["-tanH", "state", "all"]);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.len() >= 5 && fields[3] == local && fields[4] == peer)
                    .then(|| rfc_name(fields[0]))
            })
            .unwrap_or("CLOSED")
            .to_owned()
    };
    (
        state(&lab.rig.client, &client, &server),
        state(&lab.rig.server, &server, &client),
    )
}

/// RFC 9293's name for a state as `ss` prints it.
fn rfc_name(ss: &str) -> &'static str {
    match ss {
        "ESTAB" => "ESTABLISHED",
        "SYN-SENT" => "SYN-SENT",
        "SYN-RECV" => "SYN-RECEIVED",
        "FIN-WAIT-1" => "FIN-WAIT-1",
        "FIN-WAIT-2" => "FIN-WAIT-2",
        "CLOSE-WAIT" => "CLOSE-WAIT",
        "CLOSING" => "CLOSING",
        "LAST-ACK" => "LAST-ACK",
        "TIME-WAIT" => "TIME-WAIT",
        "LISTEN" => "LISTEN",
        "UNCONN" | "CLOSE" => "CLOSED",
        other => panic!("ss printed a state it has no RFC 9293 name for: {other}"),
    }
}

/// The states `tcpguard flows` shows for the connection from the client's `port`; a
/// connection it no longer lists is CLOSED at both ends.
fn tracked_states(lab: &Lab, port: u16) -> (String, String) {
    let client = format!("{CLIENT}:{port}");
    flows(&lab.daemon.paths)
        .iter()
        .find(|flow| flow["client"].as_str() == Some(client.as_str()))
        .map_or(("CLOSED".to_owned(), "CLOSED".to_owned()), |flow| {
            let state = |end: &str| flow[end].as_str().unwrap_or("").to_owned();
            (state("client_state"), state("server_state"))
        })
}

/// Waits until `tcpguard flows` shows the connection from `port` in the states the kernel's
/// sockets are in, and returns them; panics with both when they do not meet. The kernel's
/// states are read afresh each time: they are the truth, whatever the test expected.
fn agrees_with_the_kernel(lab: &Lab, port: u16, what: &str) -> (String, String) {
    let mut last = None;
    for _ in 0..100 {
        let kernel = kernel_states(lab, port);
        let tracked = tracked_states(lab, port);
        if kernel == tracked {
            return kernel;
        }
        last = Some((kernel, tracked));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (kernel, tracked) = last.unwrap_or_default();
    panic!(
        "{what} (client port {port}): the kernel's sockets are {kernel:?} (client, server), \
         tcpguard flows shows {tracked:?}"
    );
}

/// A page from a server that closes after the response, fetched by curl; the client port.
fn curl_fetch(lab: &Lab) -> u16 {
    let listener = lab.listener.try_clone().unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accepting curl");
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") {
            stream
                .read_exact(&mut byte)
                .expect("reading curl's request");
            request.push(byte[0]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            .unwrap();
    });
    let output = lab.rig.client.run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{local_port}",
            &format!("http://{SERVER}:{PORT}/"),
        ],
    );
    server.join().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let (body, port) = text.rsplit_once('\n').expect("curl's body and local port");
    assert_eq!(body, "hello");
    port.trim().parse().expect("curl's local port")
}

/// How the two ends of a test connection finish.
#[derive(Clone, Copy, Debug)]
enum Ending {
    ClientCloses,
    ServerCloses,
    BothClose,
    HalfClose,
    ClientResets,
    ServerResets,
}

/// One connection through its lifecycle, compared with the kernel's sockets at every stable
/// point; the client port.
fn live_through(lab: &Lab, ending: Ending) -> u16 {
    let (mut client, mut server) = lab.connect();
    let port = client_port(&client);
    let what = format!("{ending:?}");
    client.write_all(b"request").unwrap();
    let mut request = [0u8; 7];
    server.read_exact(&mut request).unwrap();
    server.write_all(b"response").unwrap();
    let mut response = [0u8; 8];
    client.read_exact(&mut response).unwrap();
    let opened = agrees_with_the_kernel(lab, port, &format!("{what}, opened"));
    assert_eq!(opened, ("ESTABLISHED".to_owned(), "ESTABLISHED".to_owned()));
    match ending {
        Ending::ClientCloses => {
            drop(client);
            assert!(read_to_end(&mut server).is_empty());
            drop(server);
        }
        Ending::ServerCloses => {
            drop(server);
            assert!(read_to_end(&mut client).is_empty());
            agrees_with_the_kernel(lab, port, &format!("{what}, server's FIN"));
            drop(client);
        }
        Ending::BothClose => {
            // Both FINs leave before either end has read the other's: they cross, or nearly.
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
            let other = barrier.clone();
            let closer = std::thread::spawn(move || {
                other.wait();
                server.shutdown(Shutdown::Write).unwrap();
                server
            });
            barrier.wait();
            client.shutdown(Shutdown::Write).unwrap();
            let mut server = closer.join().unwrap();
            assert!(read_to_end(&mut client).is_empty());
            assert!(read_to_end(&mut server).is_empty());
            drop((client, server));
        }
        Ending::HalfClose => {
            client.shutdown(Shutdown::Write).unwrap();
            assert!(read_to_end(&mut server).is_empty());
            agrees_with_the_kernel(lab, port, &format!("{what}, half-closed"));
            server.write_all(&[7u8; 64 * 1024]).unwrap();
            drop(server);
            assert_eq!(read_to_end(&mut client).len(), 64 * 1024);
            drop(client);
        }
        Ending::ClientResets => {
            reset_on_close(&client);
            drop(client);
            assert!(
                server.read(&mut [0u8; 1]).is_err(),
                "the server sees the reset"
            );
            drop(server);
        }
        Ending::ServerResets => {
            reset_on_close(&server);
            drop(server);
            assert!(
                client.read(&mut [0u8; 1]).is_err(),
                "the client sees the reset"
            );
            drop(client);
        }
    }
    agrees_with_the_kernel(lab, port, &format!("{what}, closed"));
    port
}

const ENDINGS: [Ending; 6] = [
    Ending::ClientCloses,
    Ending::ServerCloses,
    Ending::BothClose,
    Ending::HalfClose,
    Ending::ClientResets,
    Ending::ServerResets,
];

/// Connections of every lifecycle, several of each, curl fetches among them: at every stable
/// point, and again once all are over, `tcpguard flows` shows what the kernel's sockets say.
/// Each connection's handshake is timed, and none is reaped for silence.
fn follows_the_kernel(lab: &Lab, origin: &str) {
    let mut ports = Vec::new();
    for _ in 0..5 {
        let port = curl_fetch(lab);
        agrees_with_the_kernel(lab, port, "a curl fetch");
        ports.push(port);
        for ending in ENDINGS {
            ports.push(live_through(lab, ending));
        }
    }
    for &port in &ports {
        agrees_with_the_kernel(lab, port, "once all are over");
    }
    let samples = scrape(&lab.rig.server);
    let count = ports.len() as f64;
    assert_eq!(
        sample(
            &samples,
            "tcpguard_connections_opened_total",
            &format!("origin=\"{origin}\"")
        ),
        count,
        "{samples:#?}"
    );
    assert_eq!(
        sample(&samples, "tcpguard_handshake_duration_seconds_count", ""),
        count,
        "every handshake timed"
    );
    assert_eq!(
        sample(
            &samples,
            "tcpguard_connections_closed_total",
            "reason=\"rst\""
        ),
        10.0,
        "the five resets of each side"
    );
    assert_eq!(
        sample(
            &samples,
            "tcpguard_connections_closed_total",
            "reason=\"timeout\""
        ),
        0.0
    );
    assert_eq!(
        sample(&samples, "tcpguard_lifecycle_events_lost_total", ""),
        0.0
    );
}

/// TIME-WAIT held as long as Linux holds it (60 s), so that both can be compared.
const LINUX_TIME_WAIT: &str = "stats_interval = 0\n";

#[test]
fn cookie_connections_end_in_the_kernels_states() {
    let lab = Lab::with(LINUX_TIME_WAIT, &[]);
    follows_the_kernel(&lab, "cookie");
}

#[test]
fn allowed_connections_end_in_the_kernels_states() {
    let lab = Lab::with(
        &format!("{LINUX_TIME_WAIT}[policy]\nallow = [\"{CLIENT}/32\"]\n"),
        &[],
    );
    follows_the_kernel(&lab, "allowed");
}

/// Outside an attack the kernel answers SYNs itself (only with tcpguard's own cookies: the
/// kernel's need `tcp_syncookies = 2`, with which the kernel answers every SYN with a cookie).
#[test]
fn kernel_handshake_connections_end_in_the_kernels_states() {
    let lab = Lab::with(
        LINUX_TIME_WAIT,
        &["--cookies", "under-attack", "--cookie-mode", "own"],
    );
    follows_the_kernel(&lab, "kernel");
}

/// A connection from the client's `port` (see [`tcpguard_tests::rig::connect_from`]), and the
/// server's end of it.
fn connect_from(lab: &Lab, port: u16) -> (TcpStream, TcpStream) {
    let client = lab.rig.client.within(move || {
        tcpguard_tests::rig::connect_from(
            SocketAddr::from((CLIENT, port)),
            SocketAddr::from((SERVER, PORT)),
        )
        .expect("connecting from a chosen port")
    });
    let (server, _) = lab.listener.accept().expect("accepting");
    (client, server)
}

/// The client connects again from the same port while the server's end of its last connection
/// is in TIME-WAIT (Linux lets the new SYN end it): each new connection is followed from its
/// start, as the kernel's sockets show it.
fn follows_a_reused_4_tuple(lab: &Lab) {
    const REUSED: u16 = 40_000;
    for round in 0..3 {
        let (mut client, server) = connect_from(lab, REUSED);
        let what = format!("connection {round} from port {REUSED}");
        let opened = agrees_with_the_kernel(lab, REUSED, &format!("{what}, opened"));
        assert_eq!(opened, ("ESTABLISHED".to_owned(), "ESTABLISHED".to_owned()));
        drop(server);
        assert!(read_to_end(&mut client).is_empty());
        drop(client);
        let closed = agrees_with_the_kernel(lab, REUSED, &format!("{what}, closed"));
        let sockets = |namespace: &tcpguard_tests::netns::Namespace| {
            String::from_utf8_lossy(&namespace.run("ss", &["-tanoiH", "state", "all"]).stdout)
                .into_owned()
        };
        assert_eq!(
            closed,
            ("CLOSED".to_owned(), "TIME-WAIT".to_owned()),
            "{what}: the client's sockets:\n{}\nthe server's:\n{}\ntcpguard status: {}",
            sockets(&lab.rig.client),
            sockets(&lab.rig.server),
            tcpguard_tests::observe::status(&lab.daemon.paths)["packets"]
        );
    }
}

#[test]
fn a_reused_4_tuple_is_followed_on_the_cookie_path() {
    follows_a_reused_4_tuple(&Lab::with(LINUX_TIME_WAIT, &[]));
}

#[test]
fn a_reused_4_tuple_is_followed_on_the_allowed_path() {
    follows_a_reused_4_tuple(&Lab::with(
        &format!("{LINUX_TIME_WAIT}[policy]\nallow = [\"{CLIENT}/32\"]\n"),
        &[],
    ));
}

/// The entries of the data plane's IPv4 and IPv6 flow maps, read from the daemon's pins.
fn flow_map_entries(lab: &Lab) -> [usize; 2] {
    use tcpguard_common::{Flow, FlowKey, FlowKeyV4, maps};
    let data = |name: &str| {
        let pin = lab.daemon.paths.pin_dir.join(name);
        aya::maps::Map::LruHashMap(
            aya::maps::MapData::from_pin(&pin).expect("opening a pinned flow map"),
        )
    };
    let v4: aya::maps::HashMap<_, FlowKeyV4, Flow> =
        aya::maps::HashMap::try_from(data(maps::FLOWS_V4)).expect("a hash map");
    let v6: aya::maps::HashMap<_, FlowKey, Flow> =
        aya::maps::HashMap::try_from(data(maps::FLOWS_V6)).expect("a hash map");
    [
        v4.keys().filter_map(Result::ok).count(),
        v6.keys().filter_map(Result::ok).count(),
    ]
}

/// `tcpguard_flow_table_entries` is what the flow map holds: a connection whose server end has
/// closed has left the map while the daemon still lists the client's TIME-WAIT, and counts
/// there only in `tcpguard_connections`.
#[test]
fn flow_table_entries_are_the_flow_maps() {
    // TIME-WAIT outlasts the test.
    let lab = Lab::with_msl(60);
    let (open_client, _open_server) = lab.connect();
    let (client, mut server) = lab.connect();
    let closing = client_port(&client);
    client.shutdown(Shutdown::Write).unwrap();
    assert!(read_to_end(&mut server).is_empty());
    drop(server);
    lab.flow_of(
        closing,
        "the client's TIME-WAIT after the server closed",
        |c, s| (c, s) == ("TIME-WAIT", "CLOSED"),
    );
    lab.flow_of(client_port(&open_client), "the open connection", |c, s| {
        (c, s) == ("ESTABLISHED", "ESTABLISHED")
    });
    assert_eq!(
        flow_map_entries(&lab),
        [1, 0],
        "only the open connection's flow, an IPv4 one"
    );
    let samples = wait_until(Duration::from_secs(5), "metrics of both", || {
        let samples = scrape(&lab.rig.server);
        (sample(
            &samples,
            "tcpguard_connections",
            "client_state=\"time_wait\",server_state=\"closed\"",
        ) == 1.0)
            .then_some(samples)
    });
    assert_eq!(
        sample(
            &samples,
            "tcpguard_connections",
            "client_state=\"established\",server_state=\"established\""
        ),
        1.0
    );
    let [v4, v6] = flow_map_entries(&lab);
    assert_eq!(
        sample(&samples, "tcpguard_flow_table_entries", "family=\"ipv4\""),
        v4 as f64
    );
    assert_eq!(
        sample(&samples, "tcpguard_flow_table_entries", "family=\"ipv6\""),
        v6 as f64
    );
    drop(client);
}

/// IPv6 connections have a flow map of their own: one is tracked there through its lifecycle,
/// counted under its family, and leaves that map when its server end closes, as IPv4 ones leave
/// theirs.
#[test]
fn an_ipv6_connection_is_followed_in_its_own_flow_map() {
    let lab = Lab::with_ipv6();
    let (client, server) = lab.connect();
    let port = client_port(&client);
    lab.flow_of(port, "an IPv6 connection", |c, s| {
        (c, s) == ("ESTABLISHED", "ESTABLISHED")
    });
    assert_eq!(flow_map_entries(&lab), [0, 1], "in the IPv6 map alone");
    wait_until(
        Duration::from_secs(5),
        "the IPv6 entry in the metrics",
        || {
            let samples = scrape(&lab.rig.server);
            let entries = |family| flow_table_entries(&samples, family);
            (entries("ipv4") == Some(0.0) && entries("ipv6") == Some(1.0)).then_some(())
        },
    );

    client_close(&lab, client, server);
    assert_eq!(flow_map_entries(&lab), [0, 0], "gone with the server's end");
    lab.untracked(port, "TIME-WAIT to run out");
}

/// A reload that denies a client cuts its tracked connections: the daemon removes their flows
/// (the data plane checks the deny list on untracked segments only), and their next segments
/// are judged, and dropped, as any other of a denied source.
#[test]
fn a_reload_that_denies_a_client_cuts_its_tracked_connections() {
    let mut lab = Lab::new();
    let (mut client, mut server) = lab.connect();
    let port = client_port(&client);
    lab.flow_of(port, "an established connection", |c, s| {
        (c, s) == ("ESTABLISHED", "ESTABLISHED")
    });
    client.write_all(b"before").unwrap();
    let mut before = [0u8; 6];
    server.read_exact(&mut before).unwrap();
    assert_eq!(flow_map_entries(&lab), [1, 0]);

    let path = std::env::temp_dir().join(format!("{}.toml", lab.rig.server.name));
    std::fs::write(
        &path,
        format!("{LAB_CONFIG}[policy]\ndeny = [\"{CLIENT}\"]\n"),
    )
    .unwrap();
    let denied = |lab: &Lab| status(&lab.daemon.paths)["packets"]["denied_source"].as_u64();
    let denied_before = denied(&lab).unwrap_or(0);
    lab.daemon.signal(libc::SIGHUP);
    lab.daemon
        .wait_for("configuration reloaded", Duration::from_secs(10));
    assert_eq!(
        flow_map_entries(&lab),
        [0, 0],
        "the denied client's flow is gone"
    );
    wait_until(
        Duration::from_secs(5),
        "the metric to follow the map",
        || {
            let samples = scrape(&lab.rig.server);
            (flow_table_entries(&samples, "ipv4") == Some(0.0)).then_some(())
        },
    );

    client.write_all(b"after").unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut after = [0u8; 5];
    let read = server.read(&mut after);
    assert!(
        read.as_ref()
            .is_err_and(|err| err.kind() == std::io::ErrorKind::WouldBlock),
        "the denied client's data does not arrive: {read:?}"
    );
    assert!(
        denied(&lab).is_some_and(|now| now > denied_before),
        "its segments were dropped as a denied source's"
    );
}

/// Drops the client's pure ACKs (TCP flags exactly ACK, in IPv4 without options) on their way
/// out of its namespace while this lives: a handshake's last ACK is lost, as a full ring or a
/// lossy link loses it. This kernel has no `gact` action: the ACKs are redirected to a veth
/// that is down, which drops them.
struct LostAcks<'a>(&'a tcpguard_tests::netns::Namespace);

impl<'a> LostAcks<'a> {
    const HOLE: &'static str = "ackhole0";

    fn start(client: &'a tcpguard_tests::netns::Namespace) -> Self {
        client.run(
            "ip",
            &[
                "link",
                "add",
                Self::HOLE,
                "type",
                "veth",
                "peer",
                "name",
                "ackhole1",
            ],
        );
        client.run("tc", &["qdisc", "add", "dev", CLIENT_IF, "clsact"]);
        // Byte 33: the TCP flags behind a 20-byte IPv4 header.
        client.run(
            "tc",
            &[
                "filter",
                "add",
                "dev",
                CLIENT_IF,
                "egress",
                "protocol",
                "ip",
                "u32",
                "match",
                "u8",
                "0x10",
                "0xff",
                "at",
                "33",
                "action",
                "mirred",
                "egress",
                "redirect",
                "dev",
                Self::HOLE,
            ],
        );
        Self(client)
    }
}

impl Drop for LostAcks<'_> {
    fn drop(&mut self) {
        for (program, args) in [
            ("tc", &["qdisc", "del", "dev", CLIENT_IF, "clsact"][..]),
            ("ip", &["link", "del", Self::HOLE][..]),
        ] {
            let _ = self.0.command(program).args(args).status();
        }
    }
}

fn connect(rig: &Rig) -> TcpStream {
    rig.client.within(|| {
        TcpStream::connect_timeout(&SocketAddr::from((SERVER, PORT)), Duration::from_secs(3))
            .expect("connecting to the server")
    })
}

fn server_resets(rig: &Rig) -> u64 {
    kernel_counters(&rig.server)["TcpOutRsts"]
}

/// The client's segment after a handshake whose pure ACK was lost.
#[derive(Clone, Copy, Debug)]
enum Next {
    Data,
    Fin,
}

/// A connection whose handshake's pure ACK is lost, then `next` from the client: the server's
/// end of it, once the listener has it, has what the client sent. Returns both ends.
fn complete_after_lost_ack(
    rig: &Rig,
    listener: &TcpListener,
    next: Next,
) -> (TcpStream, TcpStream) {
    let mut client = {
        let _lost = LostAcks::start(&rig.client);
        connect(rig)
    };
    match next {
        Next::Data => client.write_all(b"ping").unwrap(),
        Next::Fin => client.shutdown(Shutdown::Write).unwrap(),
    }
    let what = format!("the connection whose ACK was lost, completed by {next:?}");
    let mut server = accept_within(listener, Duration::from_secs(10)).expect(&what);
    assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());
    let received = match next {
        Next::Data => {
            let mut data = vec![0u8; 4];
            server
                .read_exact(&mut data)
                .expect("reading the client's data");
            data
        }
        Next::Fin => read_to_end(&mut server),
    };
    let sent: &[u8] = match next {
        Next::Data => b"ping",
        Next::Fin => b"",
    };
    assert_eq!(received, sent, "{what}: what the server's end received");
    (client, server)
}

/// The client's ACK that completes the handshake never arrives: its next segment, data or a
/// FIN, completes it instead, as the kernel lets it (a cookie ACK is any ACK that returns the
/// cookie). First without tcpguard, the kernel's own handshake; then through tcpguard, whose
/// tracked states must be the kernel's sockets'. Neither server sends a reset.
#[test]
fn a_handshake_whose_last_ack_is_lost_completes_with_the_next_segment() {
    let bare = Rig::new();
    let listener = bare
        .server
        .within(|| TcpListener::bind(("0.0.0.0", PORT)).unwrap());
    let resets = server_resets(&bare);
    for next in [Next::Data, Next::Fin] {
        complete_after_lost_ack(&bare, &listener, next);
    }
    assert_eq!(server_resets(&bare), resets, "without tcpguard: no reset");

    let lab = Lab::new();
    let resets = server_resets(&lab.rig);
    for (next, wanted) in [
        (Next::Data, ("ESTABLISHED", "ESTABLISHED")),
        (Next::Fin, ("FIN-WAIT-2", "CLOSE-WAIT")),
    ] {
        let (client, _server) = complete_after_lost_ack(&lab.rig, &lab.listener, next);
        let what = format!("the connection completed by {next:?}");
        let states = agrees_with_the_kernel(&lab, client_port(&client), &what);
        assert_eq!((states.0.as_str(), states.1.as_str()), wanted, "{what}");
    }
    assert_eq!(
        server_resets(&lab.rig),
        resets,
        "through tcpguard: no reset"
    );
}

/// The server's kernel drops the handshake's last ACK after tcpguard passed it: here because
/// the listener's accept queue is full. The client's data, retransmitted until the queue has
/// room, completes the handshake, as it would have without tcpguard; the server sends no reset.
#[test]
fn an_ack_the_kernel_drops_after_tcpguard_passed_it_costs_no_connection() {
    // With the kernel's cookies no ACK is dropped this way: the kernel's cookie helper, like
    // the kernel, answers no SYN while the accept queue is full.
    if !tcpguard_tests::rig::own_cookies() {
        return;
    }
    let lab = Lab::new();
    // Backlog 0: one connection waiting to be accepted fills the queue.
    // SAFETY: listen() on a listening socket this test owns only changes its backlog.
    assert_eq!(unsafe { libc::listen(lab.listener.as_raw_fd(), 0) }, 0);
    let first = connect(&lab.rig);
    let before = kernel_counters(&lab.rig.server);
    let mut second = connect(&lab.rig);
    wait_until(
        Duration::from_secs(5),
        "the server's kernel to drop the second ACK for the full queue",
        || {
            let now = kernel_counters(&lab.rig.server);
            (now["TcpExtListenOverflows"] > before["TcpExtListenOverflows"]).then_some(())
        },
    );
    second.write_all(b"ping").unwrap();
    // The data finds the queue full too: give it time to be turned away at least once.
    std::thread::sleep(Duration::from_millis(300));
    let accepted =
        accept_within(&lab.listener, Duration::from_secs(5)).expect("the first connection");
    assert_eq!(accepted.peer_addr().unwrap(), first.local_addr().unwrap());
    let mut server = accept_within(&lab.listener, Duration::from_secs(10))
        .expect("the second connection, built from its retransmitted data");
    assert_eq!(server.peer_addr().unwrap(), second.local_addr().unwrap());
    let mut got = [0u8; 4];
    server
        .read_exact(&mut got)
        .expect("reading the client's data");
    assert_eq!(&got, b"ping");
    let states = agrees_with_the_kernel(&lab, client_port(&second), "the second connection");
    assert_eq!(states, ("ESTABLISHED".to_owned(), "ESTABLISHED".to_owned()));
    assert_eq!(
        kernel_counters(&lab.rig.server)["TcpOutRsts"],
        before["TcpOutRsts"],
        "the server sent no reset"
    );
}
