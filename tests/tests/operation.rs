//! The daemon as an operator runs it: out-of-state floods dropped while real connections go on,
//! configuration reloads (bad ones refused), source policy, systemd readiness, a restart in
//! the middle of a SYN flood, and which pinned links a restarted daemon adopts.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, MapData};
use tcpguard::{AttachMode, Guard, GuardError, guard::LoadOptions};
use tcpguard_common::maps;
use tcpguard_tests::{
    netns::Namespace,
    observe::{flows, sample, scrape, status, wait_until},
    rig::{CLIENT, Daemon, DaemonPaths, Flood, Rig, SERVER, SERVER_IF, kernel_counters},
};

const PORT: u16 = 8080;

fn connect(client: &Namespace, timeout: Duration) -> std::io::Result<TcpStream> {
    client.within(move || TcpStream::connect_timeout(&SocketAddr::from((SERVER, PORT)), timeout))
}

/// A server in `namespace` that echoes lines on every connection it accepts.
fn echo_server(namespace: &Namespace) {
    let listener = namespace.within(|| TcpListener::bind(("0.0.0.0", PORT)).unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if writeln!(writer, "{line}").is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn echo(stream: &mut TcpStream, text: &str) {
    writeln!(stream, "{text}").unwrap();
    let mut line = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim_end(), text);
}

fn config_file(rig: &Rig, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.toml", rig.server.name));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn out_of_state_floods_are_dropped_while_connections_keep_working() {
    let rig = Rig::new();
    let daemon = Daemon::start(&rig.server, &["--iface", SERVER_IF, "--port", "8080"]);
    echo_server(&rig.server);
    let mut live = connect(&rig.client, Duration::from_secs(3)).expect("connecting");
    live.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo(&mut live, "before");
    let live_port = live.local_addr().unwrap().port().to_string();
    let before = kernel_counters(&rig.server);

    let packets = 20_000;
    let floods = [
        Flood::start(
            &rig.client,
            &["-F", "-A", "--rand-source"],
            PORT,
            10,
            packets,
        ),
        Flood::start(&rig.client, &["-R", "--rand-source"], PORT, 10, packets),
        Flood::start(&rig.client, &["-A", "--rand-source"], PORT, 10, packets),
        // Blind resets aimed at the live connection itself: its own 4-tuple, any sequence number.
        Flood::start(
            &rig.client,
            &["-R", "-s", &live_port, "-k"],
            PORT,
            10,
            5_000,
        ),
    ];
    for flood in floods {
        echo(&mut live, "during");
        flood.wait();
    }
    echo(&mut live, "after");

    let after = kernel_counters(&rig.server);
    let samples = scrape(&rig.server);
    let dropped = |reason: &str| {
        sample(
            &samples,
            "tcpguard_xdp_packets_total",
            &format!("reason=\"{reason}\",verdict=\"drop\""),
        )
    };
    // RSTs of no connection, and ACKs, FIN or not, with no valid cookie, die in XDP.
    assert!(
        dropped("no_connection") >= 0.9 * f64::from(packets),
        "{samples:#?}"
    );
    assert!(dropped("cookie_rejected") >= 0.9 * 2.0 * f64::from(packets));
    // The blind resets reached the kernel (the 4-tuple is tracked), which ignored them, as did
    // the daemon: RFC 5961 wants the exact sequence number.
    let flow = flows(&daemon.paths)
        .into_iter()
        .find(|flow| flow["client"] == format!("{CLIENT}:{live_port}"))
        .expect("the live connection is still tracked");
    assert_eq!(
        (&flow["client_state"], &flow["server_state"]),
        (&"ESTABLISHED".into(), &"ESTABLISHED".into())
    );
    assert_eq!(
        sample(
            &samples,
            "tcpguard_connections_closed_total",
            "reason=\"rst\""
        ),
        0.0
    );
    let resets = after["TcpOutRsts"] - before["TcpOutRsts"];
    assert_eq!(resets, 0, "the server sent RSTs to flood packets");
}

#[test]
fn reload_applies_policy_and_a_bad_file_keeps_the_running_config() {
    let rig = Rig::new();
    // TIME-WAIT of 2 s, so that closed connections stop counting against the source limit
    // within the test.
    let base = "interface = \"srv0\"\nports = [8080]\nstats_interval = 0\n[timeouts]\nmsl = 1\n";
    let path = config_file(&rig, base);
    // systemd's readiness protocol, on a socket this test plays systemd with.
    let notify_path = std::env::temp_dir().join(format!("{}.notify", rig.server.name));
    let _ = std::fs::remove_file(&notify_path);
    let systemd = UnixDatagram::bind(&notify_path).unwrap();
    systemd
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut daemon = Daemon::start_with_env(
        &rig.server,
        DaemonPaths::for_namespace(&rig.server),
        &["--config", path.to_str().unwrap()],
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    );
    let mut message = [0u8; 512];
    let len = systemd.recv(&mut message).expect("READY=1 from tcpguard");
    assert!(
        String::from_utf8_lossy(&message[..len]).starts_with("READY=1\n"),
        "{}",
        String::from_utf8_lossy(&message[..len])
    );
    echo_server(&rig.server);
    let paths = daemon.paths.clone();
    let origin = |stream: &TcpStream| {
        let client = format!("{CLIENT}:{}", stream.local_addr().unwrap().port());
        wait_until(Duration::from_secs(5), "the connection in flows", || {
            flows(&paths)
                .into_iter()
                .find(|flow| flow["client"] == client)
                .map(|flow| flow["origin"].as_str().unwrap().to_owned())
        })
    };
    let first = connect(&rig.client, Duration::from_secs(3)).unwrap();
    assert_eq!(origin(&first), "cookie");
    drop(first);

    // A file with an unknown key: reported, and nothing changes.
    std::fs::write(
        &path,
        "interface = \"srv0\"\nports = [9090]\ncolour = \"red\"\n",
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    let line = daemon.wait_for("configuration not reloaded", Duration::from_secs(10));
    assert!(line.contains("unknown field `colour`"), "{line}");
    assert_eq!(status(&daemon.paths)["ports"], serde_json::json!([8080]));
    assert!(connect(&rig.client, Duration::from_secs(3)).is_ok());
    // Its close over before the client is denied: a final ACK the deny list drops would leave
    // the server in LAST-ACK, in the kernel and in `flows`, past the wait below.
    wait_until(Duration::from_secs(10), "the connection's close", || {
        (status(&daemon.paths)["tracked_connections"] == 0).then_some(())
    });

    // Deny the client: its packets die in XDP.
    std::fs::write(
        &path,
        format!("{base}[policy]\ndeny = [\"10.201.0.0/24\"]\n"),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    daemon.wait_for("configuration reloaded", Duration::from_secs(10));
    let len = systemd.recv(&mut message).unwrap();
    let reloading = String::from_utf8_lossy(&message[..len]).into_owned();
    assert_eq!(reloading, "RELOADING=1");
    assert!(connect(&rig.client, Duration::from_millis(1500)).is_err());

    // Allow it instead: its SYNs go straight to the kernel and the handshake is tracked from
    // the SYN on.
    std::fs::write(&path, format!("{base}[policy]\nallow = [\"10.201.0.2\"]\n")).unwrap();
    daemon.signal(libc::SIGHUP);
    daemon.wait_for("configuration reloaded", Duration::from_secs(10));
    let allowed = connect(&rig.client, Duration::from_secs(3)).unwrap();
    assert_eq!(origin(&allowed), "allowed");
    drop(allowed);

    // A limit of two connections per source: the third SYN is dropped.
    std::fs::write(
        &path,
        format!("{base}[policy]\nmax_connections_per_source = 2\n"),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    daemon.wait_for("configuration reloaded", Duration::from_secs(10));
    wait_until(
        Duration::from_secs(10),
        "the closes above to be over",
        || (status(&daemon.paths)["tracked_connections"] == 0).then_some(()),
    );
    let kept = [
        connect(&rig.client, Duration::from_secs(3)).expect("under the limit"),
        connect(&rig.client, Duration::from_secs(3)).expect("at the limit"),
    ];
    wait_until(Duration::from_secs(5), "two tracked connections", || {
        (status(&daemon.paths)["tracked_connections"] == 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(connect(&rig.client, Duration::from_millis(1500)).is_err());

    let samples = scrape(&rig.server);
    let counted = |reason: &str, verdict: &str| {
        sample(
            &samples,
            "tcpguard_xdp_packets_total",
            &format!("reason=\"{reason}\",verdict=\"{verdict}\""),
        )
    };
    assert!(counted("denied_source", "drop") >= 1.0, "{samples:#?}");
    assert!(counted("allowed_source", "pass") >= 1.0);
    assert!(counted("source_limit", "drop") >= 1.0);
    assert_eq!(sample(&samples, "tcpguard_sources_at_limit", ""), 1.0);
    assert_eq!(
        sample(
            &samples,
            "tcpguard_config_reloads_total",
            "result=\"failure\""
        ),
        1.0
    );
    assert_eq!(
        sample(
            &samples,
            "tcpguard_config_reloads_total",
            "result=\"success\""
        ),
        3.0
    );
    drop(kept);
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(notify_path);
}

/// A deny list of `others` /32s in 172.16.0.0/12 and the client's /24, as TOML.
fn deny_list(others: u32) -> String {
    let mut list: Vec<String> = (0..others)
        .map(|n| format!("\"{}\"", std::net::Ipv4Addr::from(0xac10_0000 + n)))
        .collect();
    list.push("\"10.201.0.0/24\"".to_owned());
    format!("[policy]\ndeny = [{}]\n", list.join(", "))
}

/// A reload that is refused changes nothing: not the lists in force (the client stays denied),
/// not the ports (a port the refused file adds stays unprotected).
#[test]
fn a_refused_reload_changes_nothing() {
    let rig = Rig::new();
    let base = "interface = \"srv0\"\nstats_interval = 0\n";
    let path = config_file(&rig, &format!("{base}ports = [8080]\n{}", deny_list(0)));
    let mut daemon = Daemon::start(&rig.server, &["--config", path.to_str().unwrap()]);
    echo_server(&rig.server);
    let _other = rig
        .server
        .within(|| TcpListener::bind(("0.0.0.0", 9090)).unwrap());
    assert!(connect(&rig.client, Duration::from_millis(1500)).is_err());

    // More prefixes than the deny tries hold, and a new port.
    std::fs::write(
        &path,
        format!(
            "{base}ports = [8080, 9090]\n{}",
            deny_list(tcpguard_common::POLICY_CAPACITY)
        ),
    )
    .unwrap();
    daemon.signal(libc::SIGHUP);
    let line = daemon.wait_for("configuration not reloaded", Duration::from_secs(20));
    assert!(line.contains("policy.deny holds 16385"), "{line}");
    assert_eq!(status(&daemon.paths)["ports"], serde_json::json!([8080]));
    assert!(
        connect(&rig.client, Duration::from_millis(1500)).is_err(),
        "the client is still denied"
    );
    let before = status(&daemon.paths)["packets"].clone();
    let to_9090 = rig.client.within(|| {
        TcpStream::connect_timeout(&SocketAddr::from((SERVER, 9090)), Duration::from_secs(3))
    });
    assert!(to_9090.is_ok(), "9090 is not protected, so not denied");
    let after = status(&daemon.paths)["packets"].clone();
    assert_eq!(
        after["syn_cookie_sent"], before["syn_cookie_sent"],
        "no cookie for 9090"
    );
    assert!(
        after["unprotected"].as_u64() > before["unprotected"].as_u64(),
        "{after}"
    );
    let _ = std::fs::remove_file(path);
}

/// Reloading a large deny list leaves no moment in which it does not hold: a denied source
/// that floods SYNs through repeated reloads gets not one cookie.
#[test]
fn reloads_of_a_large_deny_list_let_no_denied_syn_through() {
    let rig = Rig::new();
    let text = format!(
        "interface = \"srv0\"\nports = [8080]\nstats_interval = 0\n{}",
        deny_list(16_000)
    );
    let path = config_file(&rig, &text);
    let mut daemon = Daemon::start(&rig.server, &["--config", path.to_str().unwrap()]);
    echo_server(&rig.server);
    let flood = Flood::start(&rig.client, &["-S"], PORT, 12, 10_000_000);
    std::thread::sleep(Duration::from_millis(500));
    let reloads = 10;
    for _ in 0..reloads {
        daemon.signal(libc::SIGHUP);
        daemon.wait_for("configuration reloaded", Duration::from_secs(20));
    }
    drop(flood);
    let packets = status(&daemon.paths)["packets"].clone();
    println!("after {reloads} reloads: {packets}");
    assert!(
        packets["denied_source"].as_u64().unwrap() >= 1000,
        "the flood reached XDP: {packets}"
    );
    assert_eq!(
        packets["syn_cookie_sent"], 0,
        "no SYN of the denied source was answered: {packets}"
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_restart_during_a_syn_flood_does_not_interrupt_protection() {
    let rig = Rig::new();
    let paths = DaemonPaths::for_namespace(&rig.server);
    let args = ["--iface", SERVER_IF, "--port", "8080", "--keep-attached"];
    let first = Daemon::start_at(&rig.server, paths.clone(), &args);
    echo_server(&rig.server);
    let before = kernel_counters(&rig.server);

    let flood = Flood::start(&rig.client, &["-S", "--rand-source"], PORT, 14, 3_000_000);
    let done = Arc::new(AtomicBool::new(false));
    let clients = {
        let done = done.clone();
        rig.client.spawn(move || {
            let (mut succeeded, mut failed) = (0, 0);
            let server = SocketAddr::from((SERVER, PORT));
            while !done.load(Ordering::Relaxed) {
                match TcpStream::connect_timeout(&server, Duration::from_secs(3)) {
                    Ok(_) => succeeded += 1,
                    Err(_) => failed += 1,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (succeeded, failed)
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let stopped_at = Instant::now();
    first.stop_with(libc::SIGTERM);
    assert!(
        String::from_utf8_lossy(&rig.server.run("ip", &["link", "show", SERVER_IF]).stdout)
            .contains("xdp"),
        "XDP stays attached while no daemon runs"
    );
    std::thread::sleep(Duration::from_secs(2));
    let second = Daemon::start_at(&rig.server, paths.clone(), &args[..4]);
    let restart = stopped_at.elapsed();
    assert!(
        second
            .log
            .iter()
            .any(|line| line.contains("adopted from the previous daemon")),
        "{:#?}",
        second.log
    );
    assert_eq!(status(&paths)["adopted"], true);
    std::thread::sleep(Duration::from_secs(3));
    done.store(true, Ordering::Relaxed);
    let (succeeded, failed) = clients.join().unwrap();
    flood.wait();
    let after = kernel_counters(&rig.server);
    let totals = second.stop();
    println!(
        "restart took {restart:?}; clients: {succeeded} connected, {failed} failed; totals: {totals:?}"
    );
    assert_eq!(
        failed, 0,
        "every client connected, before, during and after the restart"
    );
    assert!(succeeded >= 20, "{succeeded} connections");
    assert_eq!(
        after["TcpExtSyncookiesSent"] - before["TcpExtSyncookiesSent"],
        0,
        "XDP answered every SYN, also while no daemon ran"
    );
    // The second daemon was not told to keep it: it detached and removed its pins.
    assert!(
        !String::from_utf8_lossy(&rig.server.run("ip", &["link", "show", SERVER_IF]).stdout)
            .contains("xdp")
    );
    assert!(!paths.pin_dir.exists());
}

/// The capabilities the systemd unit grants (its CapabilityBoundingSet) are enough: as root
/// with every other capability gone, tcpguard sets its sysctls, loads, attaches, pins and
/// protects.
#[test]
fn the_units_capabilities_are_enough() {
    let set = format!(
        "-all,{}",
        setpriv_capabilities(&unit_setting("CapabilityBoundingSet"))
    );
    let rig = Rig::new();
    let daemon = Daemon::start_wrapped(
        &rig.server,
        DaemonPaths::for_namespace(&rig.server),
        &["setpriv", "--bounding-set", &set, "--inh-caps", &set, "--"],
        &["--iface", SERVER_IF, "--port", "8080"],
        &[],
    );
    echo_once(&rig, "capable");
    let status = rig.server.run(
        "grep",
        &["CapEff", &format!("/proc/{}/status", daemon.pid())],
    );
    let effective = String::from_utf8_lossy(&status.stdout).into_owned();
    // CAP_NET_ADMIN is bit 12, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(
        effective.split_whitespace().nth(1),
        Some("000000c000001000"),
        "tcpguard's effective capabilities"
    );
    assert_a_cookie_was_accepted(daemon);
}

/// Connects through the rig's server, which echoes one line of `text`.
fn echo_once(rig: &Rig, text: &str) {
    echo_server(&rig.server);
    let mut stream = connect(&rig.client, Duration::from_secs(3)).expect("connecting");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    echo(&mut stream, text);
}

/// Stops `daemon` and asserts that it accepted a cookie.
fn assert_a_cookie_was_accepted(daemon: Daemon) {
    let totals = daemon.stop();
    assert!(
        totals
            .iter()
            .any(|(name, value)| name == "cookie_accepted" && *value >= 1),
        "{totals:?}"
    );
}

/// The unit's capabilities (`CAP_BPF CAP_NET_ADMIN ...`) as setpriv takes them (`+bpf,...`).
fn setpriv_capabilities(unit_list: &str) -> String {
    unit_list
        .split_whitespace()
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The systemd unit's value of `key`.
fn unit_setting(key: &str) -> String {
    let unit = include_str!("../../systemd/tcpguard.service");
    unit.lines()
        .find_map(|line| line.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("the unit sets {key}"))
        .to_owned()
}

/// As the unit runs it: a user of its own (here `nobody`, owner of the pin directory and the
/// control socket's directory) with the unit's ambient capabilities and nothing else, tcpguard
/// sets its sysctls, loads, attaches, pins and protects.
#[test]
fn an_unprivileged_user_with_the_units_ambient_capabilities_protects() {
    let ambient = unit_setting("AmbientCapabilities");
    assert_eq!(ambient, unit_setting("CapabilityBoundingSet"));
    assert_eq!(unit_setting("User"), "tcpguard");
    let set = setpriv_capabilities(&ambient);
    let rig = Rig::new();
    let mut paths = DaemonPaths::for_namespace(&rig.server);
    let socket_dir = PathBuf::from(format!("/run/tcpguard-tests/{}-user", rig.server.name));
    for dir in [&paths.pin_dir, &socket_dir] {
        std::fs::create_dir_all(dir).unwrap();
        std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    }
    paths.control_socket = socket_dir.join("control.sock");
    let daemon = Daemon::start_wrapped(
        &rig.server,
        paths.clone(),
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &format!("--bounding-set=-all,{set}"),
            &format!("--inh-caps=-all,{set}"),
            &format!("--ambient-caps=-all,{set}"),
            "--",
        ],
        &["--iface", SERVER_IF, "--port", "8080"],
        &[],
    );
    echo_once(&rig, "unprivileged");
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap()
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534", "not root");
    // CAP_NET_ADMIN is bit 12, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(field("CapEff:"), "000000c000001000");
    assert_eq!(field("CapAmb:"), "000000c000001000");
    assert_eq!(status(&paths)["ports"], serde_json::json!([8080]));
    let pinned = std::fs::metadata(paths.pin_dir.join("FLOWS_V4")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&pinned),
        65534,
        "the pins are the user's"
    );
    assert_a_cookie_was_accepted(daemon);
    let _ = std::fs::remove_dir(&paths.pin_dir);
    let _ = std::fs::remove_dir(&socket_dir);
}

/// `systemd-analyze security` rates the unit at an exposure of 2.0 or less (its threshold is
/// in tenths), where the host's systemd can rate a unit file offline (250 and later); the VM
/// test rates the installed unit in both its guests (Debian 12 and 13) too.
#[test]
fn the_unit_is_rated_an_exposure_of_2_or_less() {
    let unit = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/tcpguard.service");
    let output = match std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20", unit])
        .output()
    {
        Ok(output) => output,
        Err(err) => {
            println!("skipped: no systemd-analyze here ({err})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    if text.contains("unrecognized option") || text.contains("Unknown option") {
        println!("skipped: this systemd-analyze cannot rate a unit file offline: {text}");
        return;
    }
    let rating = text
        .lines()
        .find(|line| line.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no rating: {text}"));
    println!("{rating}");
    assert!(output.status.success(), "rated above 2.0: {text}");
}

/// Removes a pin directory when dropped, also when the test panics: a pinned link keeps its
/// program attached for as long as its pin exists.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = tcpguard::bpffs::remove_pins(&self.0);
    }
}

fn load_pinned(dir: &Path) -> Guard {
    Guard::load_with(&LoadOptions {
        pin_dir: Some(dir.to_owned()),
        ..LoadOptions::default()
    })
    .expect("loading tcpguard")
}

/// An upgrade over a pin directory where an earlier tcpguard pinned its protected ports (an
/// array map of 65,536 entries, before they became global data each load has to itself)
/// removes that pin, which nothing reads any more, and protects ports in the new table.
#[test]
fn protected_ports_pinned_by_an_earlier_tcpguard_are_removed() {
    tcpguard_tests::rig::ensure_bpffs();
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/tcpguard-retired-{}",
        std::process::id()
    ));
    tcpguard::bpffs::remove_pins(&dir).expect("clearing a stale pin directory");
    let _pins = Pins(dir.clone());
    tcpguard::bpffs::prepare_pin_dir(&dir).expect("making the pin directory");
    let pin = dir.join("PROTECTED_PORTS");
    let old: Array<MapData, tcpguard_common::ProtectedPort> =
        Array::create(u32::from(u16::MAX) + 1, 0).expect("a map of the earlier layout");
    old.pin(&pin).expect("pinning it");
    assert!(pin.exists());
    let mut guard = load_pinned(&dir);
    assert!(!pin.exists(), "the earlier protected ports' pin is removed");
    assert!(
        !dir.join(maps::PROTECTED_PORTS).exists(),
        "the port table is never pinned: aya would zero a pinned one at every load"
    );
    guard
        .set_ports(&[PORT].into())
        .expect("protecting a port in the new table");
}

/// Where pinned links are attached is the kernel's answer, whatever their pins' names say: the
/// links pinned on one interface are adopted there (under names that claim another interface
/// and mode), refused for another interface (naming theirs), and refused with a sentence saying
/// so once their interface is gone.
#[test]
fn pinned_links_are_adopted_on_their_interface_only() {
    let namespace = Namespace::new("adopt");
    namespace.run(
        "ip",
        &["link", "add", "ga0", "type", "veth", "peer", "name", "ga1"],
    );
    namespace.run(
        "ip",
        &["link", "add", "gb0", "type", "veth", "peer", "name", "gb1"],
    );
    for interface in ["ga0", "ga1", "gb0"] {
        namespace.run("ip", &["link", "set", interface, "up"]);
    }
    tcpguard_tests::rig::ensure_bpffs();
    let dir = PathBuf::from(format!("/sys/fs/bpf/{}-adopt", namespace.name));
    tcpguard::bpffs::remove_pins(&dir).expect("clearing a stale pin directory");
    let pins = Pins(dir.clone());
    let tc_mode = {
        let dir = dir.clone();
        namespace.within(move || {
            let tc_mode = tcpguard::tc::probe(c"ga0").expect("probing TCX").mode;
            let mut first = load_pinned(&dir);
            let attached = first
                .attach("ga0", AttachMode::Auto, tc_mode)
                .expect("attaching to ga0");
            assert!(!attached.adopted);
            let mode = attached.mode;
            first.release().expect("leaving the links pinned");
            // The pins' names now lie about interface and mode: adoption must ask the kernel.
            for entry in std::fs::read_dir(&dir).expect("reading the pin directory") {
                let name = entry.expect("a pin").file_name().into_string().unwrap();
                if name.starts_with("link_") && name.contains("ga0") {
                    let lie = name.replace("ga0", "gb0").replace("native", "skb");
                    std::fs::rename(dir.join(&name), dir.join(&lie)).expect("renaming a pin");
                }
            }

            let mut second = load_pinned(&dir);
            let adopted = second
                .attach("ga0", AttachMode::Auto, tc_mode)
                .expect("adopting ga0's links");
            assert!(adopted.adopted);
            assert_eq!((adopted.mode, adopted.tc_mode), (mode, tc_mode));
            second.release().expect("leaving the links pinned again");

            match load_pinned(&dir).attach("ga1", AttachMode::Auto, tc_mode) {
                Err(GuardError::OtherInterface { pinned, wanted, .. }) => {
                    assert_eq!((pinned.as_str(), wanted.as_str()), ("ga0", "ga1"));
                }
                other => panic!("attaching to ga1: {other:?}"),
            }
            tc_mode
        })
    };

    // The interface goes (its peer with it), and its links are attached to nothing.
    namespace.run("ip", &["link", "del", "ga0"]);
    let refused = {
        let dir = dir.clone();
        namespace.within(
            move || match load_pinned(&dir).attach("gb0", AttachMode::Auto, tc_mode) {
                Err(err @ GuardError::StrayLink { .. }) => err.to_string(),
                other => panic!("attaching to gb0: {other:?}"),
            },
        )
    };
    assert!(
        refused.contains(
            "is attached to no interface of this network namespace (the one it was attached to is gone, or in another namespace); run `tcpguard detach` before protecting gb0"
        ),
        "{refused}"
    );
    drop(pins);
    assert!(!dir.exists(), "detach removed the pins");
}
