//! A server namespace and a client namespace joined by a veth pair, set up the way
//! ARCHITECTURE.md says XDP_TX over veth needs: TX checksum offload off on both ends, and an
//! XDP program on the client's end so that frames sent back with XDP_TX reach it.

use std::{
    ffi::CString,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};

use crate::netns::Namespace;

pub const SERVER_IF: &str = "srv0";
pub const CLIENT_IF: &str = "cli0";
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

pub struct Rig {
    /// Keeps the client end's XDP_PASS program attached.
    _client_xdp: Ebpf,
    pub client: Namespace,
    pub server: Namespace,
}

impl Rig {
    pub fn new() -> Self {
        let server = Namespace::new("srv");
        let client = Namespace::new("cli");
        server.run(
            "ip",
            &[
                "link",
                "add",
                SERVER_IF,
                "type",
                "veth",
                "peer",
                "name",
                CLIENT_IF,
                "netns",
                &client.name,
            ],
        );
        for (namespace, interface, address) in
            [(&server, SERVER_IF, SERVER), (&client, CLIENT_IF, CLIENT)]
        {
            namespace.run(
                "ip",
                &["addr", "add", &format!("{address}/24"), "dev", interface],
            );
            namespace.run("ip", &["link", "set", interface, "up"]);
            namespace.run("ethtool", &["-K", interface, "tx", "off"]);
        }
        let client_xdp = client.within(|| {
            let mut ebpf = crate::xdp::load_pass();
            let program: &mut Xdp = ebpf.program_mut("xdp_pass").unwrap().try_into().unwrap();
            let interface = CString::new(CLIENT_IF).expect("an interface name without NUL");
            program
                .attach(&interface, XdpMode::Driver)
                .expect("attaching xdp_pass to the client's veth end");
            ebpf
        });
        Self {
            _client_xdp: client_xdp,
            client,
            server,
        }
    }
}

/// Where the benchmark generator's SYNs come from: a range the server routes back over the veth
/// only when a test adds the route.
pub const SYN_FLOOD_SOURCES: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 128, 0, 0), 9);

impl Rig {
    /// The benchmark generator aimed at the server's `port` from the client's end, with Linux's
    /// SYN options, and GRO turned on at the server's end: redirected frames need the NAPI poll
    /// it gives a veth without XDP.
    pub fn syn_flood(&self, port: u16) -> crate::generator::SynFlood {
        self.server.run("ethtool", &["-K", SERVER_IF, "gro", "on"]);
        crate::generator::SynFlood {
            interface: CLIENT_IF.to_owned(),
            source_mac: mac(&self.client, CLIENT_IF),
            destination_mac: mac(&self.server, SERVER_IF),
            sources: SYN_FLOOD_SOURCES,
            destination: SERVER,
            port,
            options: crate::frame::linux_syn_options(1460, 1, 7),
        }
    }
}

impl Default for Rig {
    fn default() -> Self {
        Self::new()
    }
}

/// The tcpguard binary next to the test executable (target/<profile>/tcpguard), or
/// $TCPGUARD_BIN.
pub fn tcpguard_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TCPGUARD_BIN") {
        return path.into();
    }
    // A test runs from target/<profile>/deps/, a binary from target/<profile>/.
    let exe = std::env::current_exe().expect("the executable's path");
    let profile = exe.parent().expect("target/<profile>/");
    let path = if profile.ends_with("deps") {
        profile
            .parent()
            .expect("target/<profile>/")
            .join("tcpguard")
    } else {
        profile.join("tcpguard")
    };
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build --bins`, which `cargo xtask test` does)",
        path.display()
    );
    path
}

/// Where a test's daemon pins its programs and answers `status`: its own, so that daemons of
/// tests running side by side (each in its own network namespace, but sharing the BPF
/// filesystem and /run) never meet.
#[derive(Clone, Debug)]
pub struct DaemonPaths {
    pub pin_dir: PathBuf,
    pub control_socket: PathBuf,
    /// The network namespace the daemon runs in, where `tcpguard` commands run too: a TC
    /// filter added through netlink can only be deleted from there.
    pub namespace: String,
}

impl DaemonPaths {
    pub fn for_namespace(namespace: &Namespace) -> Self {
        ensure_bpffs();
        Self {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{}", namespace.name)),
            control_socket: PathBuf::from(format!("/run/tcpguard-tests/{}.sock", namespace.name)),
            namespace: namespace.name.clone(),
        }
    }

    /// Runs `tcpguard` with `args` and these paths in the daemon's network namespace, and
    /// returns its output.
    pub fn tcpguard(&self, args: &[&str]) -> std::process::Output {
        // nsenter rather than `ip netns exec`: see Daemon::start_wrapped.
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.namespace_path().display()))
            .arg(tcpguard_binary())
            .args(args);
        match args.first() {
            Some(&"status" | &"flows") => command.arg("--socket").arg(&self.control_socket),
            Some(&"detach") => command.arg("--pin-dir").arg(&self.pin_dir),
            _ => &mut command,
        };
        command.output().expect("running tcpguard")
    }
}

impl DaemonPaths {
    fn namespace_path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.namespace))
    }

    /// Detaches whatever the daemon left, also when its namespace is gone already (a test's
    /// rig dropped first): its interfaces, and any TC filter on them, went with it, so only
    /// the pins are left, and the record of a netlink filter, which names that namespace, is
    /// removed here rather than by `tcpguard detach` in another one.
    fn clean_up(&self) {
        if self.namespace_path().exists() {
            let _ = self.tcpguard(&["detach"]);
            return;
        }
        if let Ok(entries) = std::fs::read_dir(&self.pin_dir) {
            for entry in entries.flatten() {
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with("tc_netlink_")
                {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let _ = Command::new(tcpguard_binary())
            .args(["detach", "--pin-dir"])
            .arg(&self.pin_dir)
            .output();
    }
}

/// Mounts a BPF filesystem on /sys/fs/bpf unless one is there (systemd mounts it at boot; a
/// bare container may not have it).
pub fn ensure_bpffs() {
    if !tcpguard::bpffs::is_bpffs(std::path::Path::new("/sys/fs/bpf")) {
        crate::netns::run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    }
}

/// The environment variable that picks the cookie path every daemon a test starts runs
/// (`own`, `kernel` or `auto`); `cargo xtask test` runs the end-to-end suites once per path.
pub const COOKIE_MODE_ENV: &str = "TCPGUARD_TEST_COOKIE_MODE";

/// `--cookie-mode` for a daemon started with `args`, unless they choose one themselves; and
/// `--cookies always`, unless they choose: the suites test the cookie paths on every SYN, and
/// the tests of `cookies = "under-attack"` say so.
fn cookie_args(args: &[&str]) -> Vec<String> {
    let mut extra = Vec::new();
    match std::env::var(COOKIE_MODE_ENV) {
        Ok(mode) if !args.contains(&"--cookie-mode") => {
            extra.extend(["--cookie-mode".to_owned(), mode]);
        }
        _ => {}
    }
    if !args.contains(&"--cookies") {
        extra.extend(["--cookies".to_owned(), "always".to_owned()]);
    }
    extra
}

/// Whether the daemons of this run answer with tcpguard's own cookies (the kernel's
/// `SyncookiesRecv` moves only on the kernel's path).
pub fn own_cookies() -> bool {
    match std::env::var(COOKIE_MODE_ENV).as_deref() {
        Ok("own") => true,
        Ok("kernel") => false,
        _ => tcpguard::reqsk::kfunc_available(),
    }
}

/// Connections built from cookies between two readings of the server's kernel counters and
/// the daemon's totals: the kernel counts those it built from its own cookie; tcpguard counts
/// the ACKs whose own cookie it accepted.
pub fn cookie_connections(
    before: &std::collections::HashMap<String, u64>,
    after: &std::collections::HashMap<String, u64>,
    totals: &[(String, u64)],
) -> u64 {
    if own_cookies() {
        totals
            .iter()
            .find(|(name, _)| name == "cookie_accepted")
            .map_or(0, |(_, value)| *value)
    } else {
        after.get("TcpExtSyncookiesRecv").copied().unwrap_or(0)
            - before.get("TcpExtSyncookiesRecv").copied().unwrap_or(0)
    }
}

/// A running `tcpguard run` in a namespace, stopped with SIGINT when dropped; whatever it left
/// pinned is removed then too.
pub struct Daemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    pub log: Vec<String>,
    pub paths: DaemonPaths,
    /// Whether dropping this removes what the daemon pinned (not after a clean stop, which
    /// may have left them for the next daemon on purpose).
    clean_up_pins: bool,
}

impl Daemon {
    /// Starts tcpguard in `namespace` with `args` after `run`, and waits until it has attached.
    pub fn start(namespace: &Namespace, args: &[&str]) -> Self {
        Self::start_at(namespace, DaemonPaths::for_namespace(namespace), args)
    }

    /// As [`Daemon::start`], with the given pin directory and control socket.
    pub fn start_at(namespace: &Namespace, paths: DaemonPaths, args: &[&str]) -> Self {
        Self::start_with_env(namespace, paths, args, &[])
    }

    /// As [`Daemon::start_at`], with extra environment variables.
    pub fn start_with_env(
        namespace: &Namespace,
        paths: DaemonPaths,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_wrapped(namespace, paths, &[], args, env)
    }

    /// As [`Daemon::start_with_env`], with tcpguard started by `wrapper` (a command that execs
    /// the rest of its arguments, such as setpriv).
    pub fn start_wrapped(
        namespace: &Namespace,
        paths: DaemonPaths,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut daemon = Self::spawn(namespace, paths, wrapper, args, env);
        daemon.wait_for("protecting TCP ports", Duration::from_secs(30));
        daemon
    }

    /// As [`Daemon::start_wrapped`], without waiting for the line that says it protects: for
    /// a daemon whose log level hides it.
    pub fn spawn(
        namespace: &Namespace,
        paths: DaemonPaths,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        // nsenter rather than `ip netns exec`, which would give tcpguard a mount namespace of
        // its own with a fresh /sys, where the BPF filesystem is not mounted.
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", namespace.name))
            .args(wrapper)
            .arg(tcpguard_binary())
            .arg("run")
            .args(args)
            .args(cookie_args(args))
            .arg("--pin-dir")
            .arg(&paths.pin_dir)
            .arg("--control-socket")
            .arg(&paths.control_socket)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpguard");
        let stderr = child.stderr.take().expect("piped stderr");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            log: Vec::new(),
            paths,
            clean_up_pins: true,
        }
    }

    /// Waits for a log line containing `text` and returns it.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "tcpguard did not log {text:?} within {timeout:?}; its log:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Log lines that arrived since the last call, without waiting.
    pub fn drain(&mut self) -> Vec<String> {
        let fresh: Vec<String> = self.lines.try_iter().collect();
        self.log.extend(fresh.iter().cloned());
        fresh
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling the nsenter process we started; it execs tcpguard in place, so
        // this pid is tcpguard's.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Sends SIGINT, waits for exit, asserts it was clean, and returns the final totals as
    /// (counter name, value) pairs.
    pub fn stop(self) -> Vec<(String, u64)> {
        self.stop_with(libc::SIGINT)
    }

    /// As [`Daemon::stop`], with `signal` instead of SIGINT.
    pub fn stop_with(mut self, signal: i32) -> Vec<(String, u64)> {
        self.signal(signal);
        let totals = self.wait_for("totals:", Duration::from_secs(20));
        let status = self.child.wait().expect("waiting for tcpguard");
        assert!(status.success(), "tcpguard exited with {status}");
        self.clean_up_pins = false;
        totals
            .split("totals:")
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    fn interrupt(&mut self) {
        self.signal(libc::SIGINT);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.interrupt();
            std::thread::sleep(Duration::from_millis(500));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if self.clean_up_pins {
            self.paths.clean_up();
        }
    }
}

/// The MAC address of `interface` in `namespace`.
pub fn mac(namespace: &Namespace, interface: &str) -> [u8; 6] {
    let output = namespace.run("cat", &[&format!("/sys/class/net/{interface}/address")]);
    let text = String::from_utf8_lossy(&output.stdout);
    let mut mac = [0u8; 6];
    for (byte, hex) in mac.iter_mut().zip(text.trim().split(':')) {
        *byte = u8::from_str_radix(hex, 16)
            .unwrap_or_else(|_| panic!("{interface} has no MAC address like 02:00:…: {text}"));
    }
    mac
}

/// The kernel's TCP counters in a namespace (`nstat -az`), by name.
pub fn kernel_counters(namespace: &Namespace) -> std::collections::HashMap<String, u64> {
    let output = namespace.run("nstat", &["-az", "--json"]);
    let text = String::from_utf8_lossy(&output.stdout);
    // {"kernel":{"IpInReceives":1,...}}: flat enough to read without a JSON parser.
    text.split(['{', '}', ','])
        .filter_map(|pair| {
            let (name, value) = pair.split_once(':')?;
            Some((
                name.trim().trim_matches('"').to_owned(),
                value.trim().parse().ok()?,
            ))
        })
        .collect()
}

/// A bounded hping3 flood from a namespace, stopped after `seconds` by `timeout`, and killed,
/// with hping3 itself, when dropped. hping3 ignores its packet count (`-c`) in `--flood` mode,
/// so the time limit is the bound that holds; the count is passed for the runs where it does
/// apply.
pub struct Flood {
    child: Child,
}

impl Flood {
    pub fn start(from: &Namespace, flags: &[&str], port: u16, seconds: u32, packets: u32) -> Self {
        Self::start_to(from, &SERVER.to_string(), flags, port, seconds, packets)
    }

    /// As [`Flood::start`], aimed at `target`.
    pub fn start_to(
        from: &Namespace,
        target: &str,
        flags: &[&str],
        port: u16,
        seconds: u32,
        packets: u32,
    ) -> Self {
        Self::spawn(from, target, &["--flood"], flags, port, seconds, packets)
    }

    /// As [`Flood::start_to`], one packet every `interval_us` microseconds instead of as fast
    /// as hping3 can (then its packet count holds too).
    pub fn paced_to(
        from: &Namespace,
        target: &str,
        flags: &[&str],
        port: u16,
        seconds: u32,
        interval_us: u32,
    ) -> Self {
        let packets = u64::from(seconds) * 1_000_000 / u64::from(interval_us.max(1));
        let pace = format!("u{interval_us}");
        Self::spawn(
            from,
            target,
            &["-i", &pace],
            flags,
            port,
            seconds,
            u32::try_from(packets).unwrap_or(u32::MAX),
        )
    }

    fn spawn(
        from: &Namespace,
        target: &str,
        rate: &[&str],
        flags: &[&str],
        port: u16,
        seconds: u32,
        packets: u32,
    ) -> Self {
        let child = from
            .command("timeout")
            .args(["-s", "INT", &seconds.to_string(), "hping3"])
            .args(rate)
            .arg("-q")
            .args(flags)
            .args(["-c", &packets.to_string(), "-p", &port.to_string()])
            .arg(target)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, which `timeout` and hping3 share, so that a drop can end
            // both: killing `timeout` alone would leave hping3 flooding.
            .process_group(0)
            .spawn()
            .expect("starting hping3 (installed by `cargo xtask setup`)");
        Self { child }
    }

    pub fn wait(mut self) {
        let _ = self.child.wait();
    }

    /// The process group of `timeout` and its hping3.
    pub fn process_group(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: the process group this flood's child leads: `timeout` and its hping3.
            unsafe {
                libc::kill(-(self.child.id() as i32), libc::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

/// A TCP connection from `source`, address and port, to `destination`, in the calling thread's
/// network namespace. The socket is bound with SO_REUSEADDR, so that a port can be taken again
/// while the server's end of its last connection is in TIME-WAIT, and is close-on-exec, as
/// std's sockets are: a process another test spawns meanwhile would otherwise keep it open,
/// and its FIN unsent, for as long as it runs.
pub fn connect_from(
    source: std::net::SocketAddr,
    destination: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    use socket2::{Domain, Socket, Type};
    // socket2 sets close-on-exec on the sockets it makes.
    let socket = Socket::new(Domain::for_address(source), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&source.into())?;
    socket.connect(&destination.into())?;
    Ok(socket.into())
}

/// The next connection `listener` has within `timeout`, if any: waited for without blocking,
/// the listener left blocking again, and the connection returned blocking, with a 5-s read
/// timeout.
pub fn accept_within(
    listener: &std::net::TcpListener,
    timeout: Duration,
) -> Option<std::net::TcpStream> {
    listener
        .set_nonblocking(true)
        .expect("making the listener non-blocking");
    let deadline = std::time::Instant::now() + timeout;
    let accepted = loop {
        match listener.accept() {
            Ok((stream, _)) => break Some(stream),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => panic!("accept: {err}"),
        }
        if std::time::Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    listener
        .set_nonblocking(false)
        .expect("making the listener blocking again");
    let stream = accepted?;
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    Some(stream)
}
