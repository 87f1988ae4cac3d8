//! `tcpguard run` with bad arguments or a bad configuration file: one clear sentence, a
//! non-zero exit, nothing attached.

use tcpguard_tests::{netns::Namespace, rig::tcpguard_binary};

fn run_in(namespace: &Namespace, args: &[&str]) -> (bool, String) {
    let output = namespace
        .command(tcpguard_binary().to_str().unwrap())
        .arg("run")
        .args(args)
        .output()
        .expect("running tcpguard");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn bad_arguments_are_refused_with_a_sentence_and_nothing_attached() {
    let namespace = Namespace::new("cli");
    let config = std::env::temp_dir().join(format!("tcpguard-cli-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "interface = \"lo\"\nports = [80]\n[policy]\nallow = [\"10.0.0.1/8\"]\n",
    )
    .unwrap();
    let unknown = std::env::temp_dir().join(format!("tcpguard-cli-{}-b.toml", std::process::id()));
    std::fs::write(&unknown, "interface = \"lo\"\nport = 80\n").unwrap();
    let cases: [(&[&str], &str); 7] = [
        (
            &["--iface", "nosuch0", "--port", "80"],
            "interface \"nosuch0\" does not exist",
        ),
        (&["--iface", "lo", "--port", "0"], "0 is not in 1..=65535"),
        (
            &["--iface", "lo"],
            "no ports to protect: set `ports` in the config file or pass --port",
        ),
        (
            &["--config", config.to_str().unwrap()],
            "\"10.0.0.1/8\" has host bits set; the prefix is 10.0.0.0/8",
        ),
        (
            &["--config", unknown.to_str().unwrap()],
            "unknown field `port`",
        ),
        (
            &["--config", "/nonexistent/tcpguard.toml"],
            "cannot read /nonexistent/tcpguard.toml",
        ),
        (
            &["--iface", "lo", "--port", "80", "--xdp-mode", "fast"],
            "is not one of auto, native, skb",
        ),
    ];
    for (args, expected) in cases {
        let (succeeded, stderr) = run_in(&namespace, args);
        assert!(!succeeded, "{args:?} must fail");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        let link = namespace.run("ip", &["link", "show", "lo"]);
        assert!(
            !String::from_utf8_lossy(&link.stdout).contains("xdp"),
            "nothing attached after {args:?}"
        );
    }
    let _ = std::fs::remove_file(config);
    let _ = std::fs::remove_file(unknown);
}

#[test]
fn keep_sysctls_refuses_to_change_them() {
    let namespace = Namespace::new("cli");
    namespace.sysctl("net.ipv4.tcp_syncookies", "1");
    let (succeeded, stderr) = run_in(
        &namespace,
        &[
            "--iface",
            "lo",
            "--port",
            "80",
            "--keep-sysctls",
            "--cookie-mode",
            "kernel",
        ],
    );
    assert!(!succeeded);
    assert!(
        stderr.contains("net.ipv4.tcp_syncookies is 1 but tcpguard needs 2"),
        "{stderr}"
    );
    let value = namespace.run("sysctl", &["-n", "net.ipv4.tcp_syncookies"]);
    assert_eq!(
        String::from_utf8_lossy(&value.stdout).trim(),
        "1",
        "left as it was"
    );
}

/// Under systemd (JOURNAL_STREAM set) log lines carry no timestamp: journald adds its own.
#[test]
fn under_journald_lines_carry_no_timestamp_of_their_own() {
    let namespace = Namespace::new("cli");
    let output = namespace
        .command(tcpguard_binary().to_str().unwrap())
        .args(["run", "--iface", "nosuch0", "--port", "80"])
        .env("JOURNAL_STREAM", "8:12345")
        .output()
        .expect("running tcpguard");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("ERROR: interface \"nosuch0\" does not exist"),
        "{stderr}"
    );
    let plain = namespace
        .command(tcpguard_binary().to_str().unwrap())
        .args(["run", "--iface", "nosuch0", "--port", "80"])
        .output()
        .expect("running tcpguard");
    assert!(
        String::from_utf8_lossy(&plain.stderr).starts_with("[20"),
        "a timestamp otherwise"
    );
}

/// `check-config` tells a fresh install (nothing configured: 1, which makes systemd skip the
/// start), a valid file (0) and a broken one (255) apart.
#[test]
fn check_config_tells_unconfigured_valid_and_broken_apart() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/tcpguard.toml");
    let check = |path: &str| {
        let output = std::process::Command::new(tcpguard_binary())
            .args(["check-config", "--config", path])
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (code, text) = check(example);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("nothing to do yet, no interface to protect"),
        "{text}"
    );
    let dir = std::env::temp_dir();
    let valid = dir.join(format!("tcpguard-check-{}.toml", std::process::id()));
    let configured = std::fs::read_to_string(example)
        .unwrap()
        .replace("# interface = \"eth0\"", "interface = \"eth0\"")
        .replace("# ports = [80, 443]", "ports = [80, 443]");
    std::fs::write(&valid, &configured).unwrap();
    let (code, text) = check(valid.to_str().unwrap());
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("protects TCP ports 80, 443 on eth0"),
        "{text}"
    );
    let broken = configured.replace("# flow_capacity = 262144", "flow_capacity = 5");
    std::fs::write(&valid, broken).unwrap();
    let (code, text) = check(valid.to_str().unwrap());
    assert_eq!(code, Some(255), "{text}");
    assert!(
        text.contains("flow_capacity 5 is not between 1024 and 16777216"),
        "{text}"
    );
    let _ = std::fs::remove_file(valid);
}

fn check_config(path: &std::path::Path) -> (Option<i32>, String) {
    let output = std::process::Command::new(tcpguard_binary())
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// What `tcpguard run` would refuse, `check-config` (the unit's ExecCondition) refuses too:
/// more prefixes than the tries hold, a pin directory that is not under a BPF filesystem, an
/// interface name the kernel never gives.
#[test]
fn check_config_refuses_what_run_refuses() {
    tcpguard_tests::rig::ensure_bpffs();
    let path = std::env::temp_dir().join(format!("tcpguard-refuse-{}.toml", std::process::id()));
    let too_many: Vec<String> = (0..=tcpguard_common::POLICY_CAPACITY)
        .map(|n| format!("\"10.{}.{}.{}\"", n >> 16, (n >> 8) & 0xff, n & 0xff))
        .collect();
    let not_bpffs = std::env::temp_dir().join(format!("tcpguard-pins-{}", std::process::id()));
    let cases = [
        (
            format!(
                "interface = \"lo\"\nports = [80]\n[policy]\ndeny = [{}]\n",
                too_many.join(",")
            ),
            "policy.deny holds 16385 distinct IPv4 prefixes; it holds at most 16384 per family"
                .to_owned(),
        ),
        (
            format!(
                "interface = \"lo\"\nports = [80]\npin_dir = \"{}\"\n",
                not_bpffs.display()
            ),
            format!("pin_dir {not_bpffs:?} is not on a BPF filesystem"),
        ),
        (
            "interface = \"lo\"\nports = [80]\npin_dir = \"/sys/fs/bpf\"\n".to_owned(),
            "pin_dir \"/sys/fs/bpf\" is the root of a BPF filesystem".to_owned(),
        ),
    ];
    let names = [
        "a:b",
        ".",
        "..",
        "et h0",
        "eth\\t0",
        "eth0\\u00a0",
        "interface-name16",
    ];
    let cases = cases.into_iter().chain(names.iter().map(|name| {
        (
            format!("interface = \"{name}\"\nports = [80]\n"),
            "is not a name an interface can have (1 to 15 bytes".to_owned(),
        )
    }));
    for (text, expected) in cases {
        std::fs::write(&path, &text).unwrap();
        let (code, said) = check_config(&path);
        let shown = &text[..text.len().min(120)];
        assert_eq!(code, Some(255), "{shown}: {said}");
        assert!(said.contains(&expected), "{shown}: {said}");
        // nsenter rather than `ip netns exec`, so that the host's BPF filesystem is there.
        let namespace = Namespace::new("cli");
        let output = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", namespace.name))
            .arg(tcpguard_binary())
            .args(["run", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{shown}");
        assert!(stderr.contains(&expected), "run: {shown}: {stderr}");
    }
    let _ = std::fs::remove_file(path);
}

/// A configuration file is read up to a limit: a device named by mistake ends in an error
/// within moments, not in exhausted memory or a read that never ends. The address space of
/// each run is capped at 1 GiB, so that a regression fails here instead of taking the host's
/// memory.
#[test]
fn configuration_files_are_read_with_a_limit() {
    use std::os::unix::process::CommandExt as _;
    for (device, subcommand) in [
        ("/dev/zero", "run"),
        ("/dev/urandom", "check-config"),
        ("/dev/zero", "check-config"),
    ] {
        let mut command = std::process::Command::new(tcpguard_binary());
        command.args([subcommand, "--config", device]);
        // SAFETY: setrlimit is async-signal-safe and touches only the child.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 1 << 30,
                    rlim_max: 1 << 30,
                };
                libc::setrlimit(libc::RLIMIT_AS, &limit);
                Ok(())
            });
        }
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > std::time::Duration::from_secs(20) {
                let _ = child.kill();
                panic!("tcpguard {subcommand} --config {device} still runs after 20 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let output = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(
            said.contains(&format!(
                "{device} is not a configuration file: it is larger than 8 MiB"
            )),
            "{subcommand} --config {device}: {said}"
        );
    }
}
