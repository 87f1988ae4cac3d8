//! Paths that cannot hurt the host: `tcpguard detach` removes only tcpguard's own pins from a
//! directory on a BPF filesystem; the control socket replaces only a stale socket; a pin
//! directory another user could tamper with is refused; an empty pin directory pins nothing
//! (what `ip netns exec`, whose /sys has no BPF filesystem, needs).

use std::{
    os::unix::{
        fs::{PermissionsExt as _, chown},
        net::UnixListener,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use tcpguard_tests::{
    netns::Namespace,
    rig::{Daemon, DaemonPaths, ensure_bpffs, tcpguard_binary},
};

/// Runs `tcpguard run args` in `namespace` (through nsenter, so that the host's BPF filesystem
/// is there) and returns its exit code and standard error, or panics when it is still running
/// after 20 s: every case here must be refused before anything is attached.
fn refused(namespace: &Namespace, args: &[&str]) -> String {
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", namespace.name))
        .arg(tcpguard_binary())
        .arg("run")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tcpguard");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let output = child.wait_with_output().unwrap();
            panic!(
                "tcpguard {args:?} ran instead of refusing: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success(), "{args:?} must fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A namespace with an Ethernet interface, `pt0`, up (tcpguard protects Ethernet only).
fn namespace_with_veth(role: &str) -> Namespace {
    let namespace = Namespace::new(role);
    namespace.run(
        "ip",
        &["link", "add", "pt0", "type", "veth", "peer", "name", "pt1"],
    );
    for interface in ["pt0", "pt1"] {
        namespace.run("ip", &["link", "set", interface, "up"]);
    }
    namespace
}

fn attached(namespace: &Namespace, interface: &str) -> bool {
    String::from_utf8_lossy(&namespace.run("ip", &["link", "show", interface]).stdout)
        .contains("xdp")
}

/// A directory that is not a BPF filesystem's, with a file in it, as /etc/tcpguard is.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tcpguard-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn detach_refuses_a_directory_that_is_not_on_a_bpf_filesystem() {
    let scratch = Scratch::new("etc");
    let config = scratch.0.join("tcpguard.toml");
    std::fs::write(&config, "interface = \"eth0\"\n").unwrap();
    // Named like tcpguard's own pins, so that only the filesystem tells them apart.
    std::fs::write(scratch.0.join("FLOWS_V4"), "not a pin").unwrap();
    let output = Command::new(tcpguard_binary())
        .args(["detach", "--pin-dir"])
        .arg(&scratch.0)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "detach must refuse: {stderr}");
    assert!(
        stderr.contains(&format!(
            "refusing to touch {}: it is not a directory on a BPF filesystem",
            scratch.0.display()
        )),
        "{stderr}"
    );
    assert!(config.exists(), "the configuration is still there");
    assert!(scratch.0.join("FLOWS_V4").exists());
}

#[test]
fn detach_removes_tcpguards_pins_and_leaves_everything_else() {
    let namespace = namespace_with_veth("detach");
    let paths = DaemonPaths::for_namespace(&namespace);
    let daemon = Daemon::start_at(
        &namespace,
        paths.clone(),
        &["--iface", "pt0", "--port", "80", "--keep-attached"],
    );
    daemon.stop();
    assert!(
        attached(&namespace, "pt0"),
        "kept attached through its pins"
    );
    // Something of another program's in the same directory.
    let other = paths.pin_dir.join("other_program");
    std::fs::create_dir(&other).unwrap();
    let output = paths.tcpguard(&["detach"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("left it with what is not tcpguard's: other_program"),
        "{stdout}"
    );
    assert!(!attached(&namespace, "pt0"), "detached");
    let left: Vec<String> = std::fs::read_dir(&paths.pin_dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["other_program"], "only what is not tcpguard's stays");
    std::fs::remove_dir(&other).unwrap();
    std::fs::remove_dir(&paths.pin_dir).unwrap();
}

#[test]
fn the_control_socket_replaces_only_a_stale_socket() {
    let namespace = namespace_with_veth("sock");
    let scratch = Scratch::new("sock");
    let socket = scratch.0.join("control.sock");
    let pin_dir = DaemonPaths::for_namespace(&namespace).pin_dir;
    let args = [
        "--iface",
        "pt0",
        "--port",
        "80",
        "--metrics-address",
        "",
        "--pin-dir",
        pin_dir.to_str().unwrap(),
        "--control-socket",
        socket.to_str().unwrap(),
    ];

    // A regular file: refused and left as it is.
    std::fs::write(&socket, "precious").unwrap();
    let stderr = refused(&namespace, &args);
    assert!(
        stderr.contains("exists and is not a socket; tcpguard replaces only a stale socket"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious");
    assert!(!attached(&namespace, "pt0"));
    std::fs::remove_file(&socket).unwrap();

    // A live socket: refused, still there.
    let live = UnixListener::bind(&socket).unwrap();
    let stderr = refused(&namespace, &args);
    assert!(stderr.contains("answers on"), "{stderr}");
    assert!(socket.exists());
    drop(live);

    // The same socket once nobody listens on it (a killed daemon's): replaced.
    let paths = DaemonPaths {
        pin_dir: pin_dir.clone(),
        control_socket: socket.clone(),
        namespace: namespace.name.clone(),
    };
    let daemon = Daemon::start_at(
        &namespace,
        paths.clone(),
        &["--iface", "pt0", "--port", "80", "--metrics-address", ""],
    );
    let status = paths.tcpguard(&["status", "--json"]);
    assert!(status.status.success(), "status answers on the new socket");
    daemon.stop();
}

#[test]
fn a_pin_directory_others_could_tamper_with_is_refused() {
    ensure_bpffs();
    let namespace = namespace_with_veth("pins");
    let dir = PathBuf::from(format!("/sys/fs/bpf/{}-theirs", namespace.name));
    let socket = format!("/run/tcpguard-tests/{}.sock", namespace.name);
    let run = |dir: &Path| {
        refused(
            &namespace,
            &[
                "--iface",
                "pt0",
                "--port",
                "80",
                "--metrics-address",
                "",
                "--control-socket",
                &socket,
                "--pin-dir",
                dir.to_str().unwrap(),
            ],
        )
    };
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = tcpguard::bpffs::remove_pins(&self.0);
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _remove = Remove(dir.clone());

    // Made by another user (nobody), as anyone may where /sys/fs/bpf is world-writable.
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    chown(&dir, Some(65534), Some(65534)).unwrap();
    let stderr = run(&dir);
    assert!(stderr.contains("belongs to uid 65534"), "{stderr}");
    assert!(!attached(&namespace, "pt0"));
    // check-config refuses it too.
    let file = std::env::temp_dir().join(format!("{}.toml", namespace.name));
    std::fs::write(
        &file,
        format!(
            "interface = \"pt0\"\nports = [80]\npin_dir = \"{}\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let check = Command::new(tcpguard_binary())
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(255));
    let _ = std::fs::remove_file(&file);

    // Root's, but writable by everyone.
    chown(&dir, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let stderr = run(&dir);
    assert!(
        stderr.contains("is writable by group or others (mode 777)"),
        "{stderr}"
    );

    // The root of a BPF filesystem is no pin directory of tcpguard's.
    let stderr = run(Path::new("/sys/fs/bpf"));
    assert!(
        stderr.contains("is the root of a BPF filesystem"),
        "{stderr}"
    );

    // A symbolic link (bpffs has them) is not followed.
    std::fs::remove_dir(&dir).unwrap();
    std::os::unix::fs::symlink("/tmp", &dir).unwrap();
    let stderr = run(&dir);
    assert!(stderr.contains("is not a directory"), "{stderr}");
    std::fs::remove_file(&dir).unwrap();
}

/// `ip netns exec` gives its command a /sys of its own, with no BPF filesystem: an empty pin
/// directory, which README documents as "not pinned", is the way to run tcpguard there.
#[test]
fn an_empty_pin_directory_pins_nothing_under_ip_netns_exec() {
    let namespace = namespace_with_veth("nopin");
    let socket = format!("/run/tcpguard-tests/{}.sock", namespace.name);
    let mut child = namespace
        .command(tcpguard_binary().to_str().unwrap())
        .args(["run", "--iface", "pt0", "--port", "80", "--pin-dir", ""])
        .args(["--control-socket", &socket])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = sender.send(line);
        }
    });
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let protecting = loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("protecting TCP ports") => break true,
            Ok(line) => log.push(line),
            Err(_) => break false,
        }
    };
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(protecting, "tcpguard did not start: {}", log.join("\n"));
    assert!(status.success(), "{status}");
    assert!(!attached(&namespace, "pt0"), "detached on exit");
    // Detach with an empty pin directory has nothing to do.
    let output = Command::new(tcpguard_binary())
        .args(["detach", "--pin-dir", ""])
        .output()
        .unwrap();
    assert!(output.status.success());
}
