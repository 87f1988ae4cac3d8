//! TC egress through netlink, as on kernels without TCX (before 6.6), forced on this one with
//! the test override `TCPGUARD_TEST_TC_NETLINK=1`: the filter the daemon adds, as the kernel's
//! own `tc` lists it, what survives a restart (the filter, and a daemon that adopts it by
//! swapping its program in place), `tcpguard detach`, a clean exit, and a killed daemon's
//! filter replaced by the next one.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tcpguard::tc::{FORCE_NETLINK_ENV, PRIORITY};
use tcpguard_tests::{
    netns::Namespace,
    observe::{flows, status, wait_until},
    rig::{Daemon, DaemonPaths, Rig, SERVER, SERVER_IF, tcpguard_binary},
};

const PORT: u16 = 8080;
const FORCE: &[(&str, &str)] = &[(FORCE_NETLINK_ENV, "1")];

/// The filters on the server interface's egress, as `tc -j filter show` lists them: the ones
/// with options (the others are the priority's chain heads).
fn egress_filters(rig: &Rig) -> Vec<Value> {
    let output = rig
        .server
        .run("tc", &["-j", "filter", "show", "dev", SERVER_IF, "egress"]);
    let filters: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap_or_default();
    filters
        .into_iter()
        .filter(|filter| filter.get("options").is_some())
        .collect()
}

/// The id of the program in tcpguard's one egress filter, after checking that it is the only
/// filter, at tcpguard's priority and handle, running tcpguard_egress in direct-action mode.
fn tcpguard_filter(rig: &Rig) -> u64 {
    let filters = egress_filters(rig);
    let [filter] = filters.as_slice() else {
        panic!("one egress filter expected: {filters:#?}");
    };
    assert_eq!(filter["kind"], "bpf", "{filter}");
    assert_eq!(filter["pref"], u64::from(PRIORITY), "{filter}");
    assert_eq!(filter["options"]["handle"], "0x1", "{filter}");
    assert_eq!(filter["options"]["direct-action"], true, "{filter}");
    assert_eq!(filter["options"]["prog"]["name"], "tcpguard_egress");
    filter["options"]["prog"]["id"]
        .as_u64()
        .expect("the filter's program id")
}

/// The TCX programs on the server interface's egress: none, on the netlink path.
fn tcx_programs(rig: &Rig) -> usize {
    rig.server.within(|| {
        let interface = std::ffi::CString::new(SERVER_IF).unwrap();
        aya::programs::SchedClassifier::query_tcx(
            interface.as_c_str(),
            aya::programs::TcAttachType::Egress,
        )
        .expect("querying TCX")
        .1
        .len()
    })
}

fn xdp_attached(rig: &Rig) -> bool {
    String::from_utf8_lossy(&rig.server.run("ip", &["link", "show", SERVER_IF]).stdout)
        .contains("xdp")
}

/// A connection the client closes first, through to the server's end CLOSED: the server's
/// FIN and ACK are seen only by the egress program.
fn close_a_connection(rig: &Rig, paths: &DaemonPaths, listener: &TcpListener) {
    let mut client = rig.client.within(|| {
        TcpStream::connect_timeout(&SocketAddr::from((SERVER, PORT)), Duration::from_secs(3))
            .expect("connecting through tcpguard")
    });
    let (mut server, _) = listener.accept().expect("accepting");
    let port = client.local_addr().unwrap().port();
    client.write_all(b"hello").unwrap();
    let mut hello = [0u8; 5];
    server.read_exact(&mut hello).unwrap();
    drop(client);
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(server.read(&mut hello).unwrap(), 0, "the client's FIN");
    drop(server);
    let client = format!("10.201.0.2:{port}");
    wait_until(
        Duration::from_secs(10),
        "the server's end CLOSED, from the egress program's report",
        || {
            flows(paths)
                .iter()
                .any(|flow| {
                    flow["client"].as_str() == Some(client.as_str())
                        && flow["client_state"] == "TIME-WAIT"
                        && flow["server_state"] == "CLOSED"
                })
                .then_some(())
        },
    );
}

#[test]
fn the_filter_survives_a_restart_is_adopted_in_place_and_goes_with_a_clean_exit() {
    let rig = Rig::new();
    let paths = DaemonPaths::for_namespace(&rig.server);
    let listener = rig
        .server
        .within(|| TcpListener::bind(("0.0.0.0", PORT)).expect("binding the test server"));
    let args = ["--iface", SERVER_IF, "--port", "8080", "--keep-attached"];
    let first = Daemon::start_with_env(&rig.server, paths.clone(), &args, FORCE);
    let protecting = first.log.last().cloned().unwrap_or_default();
    assert!(
        protecting.contains(&format!(
            "TC egress through netlink because {FORCE_NETLINK_ENV}=1"
        )),
        "{protecting}"
    );
    assert_eq!(status(&paths)["tc_attach"], "netlink");
    let first_program = tcpguard_filter(&rig);
    assert_eq!(tcx_programs(&rig), 0, "no TCX program on the netlink path");
    close_a_connection(&rig, &paths, &listener);

    // Stopped with on_exit = "keep": XDP stays through its pinned link, the filter through the
    // qdisc, with the first daemon's program.
    first.stop_with(libc::SIGTERM);
    assert!(
        xdp_attached(&rig),
        "XDP stays attached while no daemon runs"
    );
    assert_eq!(tcpguard_filter(&rig), first_program);

    let second = Daemon::start_with_env(&rig.server, paths.clone(), &args[..4], FORCE);
    assert!(
        second
            .log
            .iter()
            .any(|line| line.contains("adopted from the previous daemon")),
        "{:#?}",
        second.log
    );
    assert_eq!(status(&paths)["adopted"], true);
    assert_eq!(status(&paths)["tc_attach"], "netlink");
    let second_program = tcpguard_filter(&rig);
    assert_ne!(
        second_program, first_program,
        "the same filter runs the second daemon's program"
    );
    close_a_connection(&rig, &paths, &listener);

    // A clean exit without on_exit = "keep" deletes the filter and detaches XDP.
    second.stop();
    assert_eq!(egress_filters(&rig), Vec::<Value>::new());
    assert!(!xdp_attached(&rig));
    assert!(!paths.pin_dir.exists());
}

#[test]
fn detach_deletes_the_filter_from_its_own_network_namespace_only() {
    let rig = Rig::new();
    let paths = DaemonPaths::for_namespace(&rig.server);
    let args = ["--iface", SERVER_IF, "--port", "8080", "--keep-attached"];
    Daemon::start_with_env(&rig.server, paths.clone(), &args, FORCE).stop();
    let program = tcpguard_filter(&rig);

    // From another network namespace the filter cannot be reached: refused, nothing removed.
    let elsewhere = Command::new(tcpguard_binary())
        .args(["detach", "--pin-dir"])
        .arg(&paths.pin_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(!elsewhere.status.success());
    assert!(
        stderr.contains(&format!(
            "tcpguard's TC egress filter on {SERVER_IF} was added through netlink in network namespace net:["
        )) && stderr.contains("run `tcpguard detach` in that namespace"),
        "{stderr}"
    );
    assert_eq!(tcpguard_filter(&rig), program);
    assert!(xdp_attached(&rig));

    let detached = paths.tcpguard(&["detach"]);
    assert!(
        detached.status.success(),
        "{}",
        String::from_utf8_lossy(&detached.stderr)
    );
    assert_eq!(egress_filters(&rig), Vec::<Value>::new());
    assert!(!xdp_attached(&rig));
    assert!(!paths.pin_dir.exists());
}

/// A daemon without a pin directory that is killed leaves its filter behind (it belongs to the
/// qdisc, not to the process), but not XDP (an unpinned link goes with its process); the next
/// daemon removes it and adds its own.
#[test]
fn a_killed_daemons_filter_is_replaced_by_the_next_one() {
    let rig = Rig::new();
    // No pin directory (an empty pin_dir in the file: the command line takes no empty value).
    let config = std::env::temp_dir().join(format!("{}.toml", rig.server.name));
    std::fs::write(&config, "pin_dir = \"\"\n").unwrap();
    // A socket per daemon: a killed one leaves its own behind.
    let start = |namespace: &Namespace, n: u32| {
        let socket = format!("/run/tcpguard-tests/{}-{n}.sock", namespace.name);
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", namespace.name))
            .arg(tcpguard_binary())
            .args(["run", "--iface", SERVER_IF, "--port", "8080", "--config"])
            .arg(&config)
            .args(["--control-socket", &socket, "--metrics-address", ""])
            .args(["--cookie-mode", "kernel"])
            .env(FORCE_NETLINK_ENV, "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpguard")
    };
    let read_until = |child: &mut std::process::Child, text: &str| {
        use std::io::BufRead as _;
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        for line in lines.by_ref().map_while(Result::ok) {
            seen.push(line.clone());
            if line.contains(text) {
                // Keep reading, so that the daemon never blocks on a full pipe.
                std::thread::spawn(move || lines.for_each(drop));
                return seen;
            }
        }
        panic!("tcpguard did not log {text:?}: {seen:#?}");
    };
    let mut first = start(&rig.server, 1);
    read_until(&mut first, "protecting TCP ports");
    let program = tcpguard_filter(&rig);
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(
        tcpguard_filter(&rig),
        program,
        "the filter outlives its daemon"
    );
    assert!(!xdp_attached(&rig), "XDP went with its daemon");

    let mut second = start(&rig.server, 2);
    let log = read_until(&mut second, "protecting TCP ports");
    assert!(
        log.iter().any(|line| line.contains(&format!(
            "removed the TC egress filter an earlier tcpguard left on {SERVER_IF}"
        ))),
        "{log:#?}"
    );
    assert_ne!(tcpguard_filter(&rig), program);
    // SAFETY: signalling the nsenter process this test started, which exec'd tcpguard.
    unsafe { libc::kill(second.id() as i32, libc::SIGINT) };
    assert!(second.wait().unwrap().success());
    assert_eq!(egress_filters(&rig), Vec::<Value>::new());
    assert!(!xdp_attached(&rig));
    let _ = std::fs::remove_file(format!("/run/tcpguard-tests/{}-1.sock", rig.server.name));
    let _ = std::fs::remove_file(config);
}
