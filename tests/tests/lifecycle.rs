//! The daemon follows real connections, between kernel TCP stacks in two network namespaces,
//! through their lifecycles: what `tcpguard flows` shows along the way and what /metrics counts
//! once they are over.

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use serde_json::Value;
use tcpguard_tests::{
    observe::{flows, http_get, sample, scrape, status, wait_until},
    rig::{Daemon, Rig, SERVER, SERVER_IF},
};

const PORT: u16 = 8080;

struct Lab {
    rig: Rig,
    daemon: Daemon,
    listener: TcpListener,
}

impl Lab {
    fn new() -> Self {
        let rig = Rig::new();
        let config = std::env::temp_dir().join(format!("{}.toml", rig.server.name));
        // TIME-WAIT lasts 2 s instead of 60 s, so that orderly closes finish within the test.
        std::fs::write(&config, "stats_interval = 0\n[timeouts]\nmsl = 1\n").unwrap();
        let daemon = Daemon::start(
            &rig.server,
            &[
                "--config",
                config.to_str().unwrap(),
                "--iface",
                SERVER_IF,
                "--port",
                &PORT.to_string(),
            ],
        );
        let listener = rig
            .server
            .within(|| TcpListener::bind(("0.0.0.0", PORT)).expect("binding the test server"));
        Self {
            rig,
            daemon,
            listener,
        }
    }

    /// A connection from the client namespace, and the server's end of it.
    fn connect(&self) -> (TcpStream, TcpStream) {
        let client = self.rig.client.within(|| {
            TcpStream::connect_timeout(&SocketAddr::from((SERVER, PORT)), Duration::from_secs(3))
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
        let client = format!("10.201.0.2:{port}");
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
        wait_until(Duration::from_secs(10), what, || {
            let gone = !flows(&self.daemon.paths)
                .iter()
                .any(|flow| flow["client"].as_str() == Some(&format!("10.201.0.2:{port}")));
            gone.then_some(())
        });
    }
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
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size passed.
    let status = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(status, 0);
}

#[test]
fn lifecycles_end_where_tcp_says_and_are_counted() {
    let lab = Lab::new();

    // Client closes first: the client ends in TIME-WAIT, the server in CLOSED.
    let (mut client, mut server) = lab.connect();
    let first = client_port(&client);
    let flow = lab.flow_of(first, "a cookie connection", |c, s| {
        (c, s) == ("ESTABLISHED", "ESTABLISHED")
    });
    assert_eq!(flow["origin"], "cookie");
    client.write_all(b"hello").unwrap();
    let mut hello = [0u8; 5];
    server.read_exact(&mut hello).unwrap();
    drop(client);
    assert!(read_to_end(&mut server).is_empty());
    drop(server);
    lab.flow_of(first, "client TIME-WAIT after a client close", |c, s| {
        (c, s) == ("TIME-WAIT", "CLOSED")
    });

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
    assert_eq!(sample(&samples, "tcpguard_flow_table_entries", ""), 0.0);
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
