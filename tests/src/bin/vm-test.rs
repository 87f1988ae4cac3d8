//! `cargo xtask vm-test`: Debian guests under qemu (software emulation), one after the other,
//! each with its virtio-net NIC on a tap device in a network namespace this test makes. A guest
//! installs tcpguard from the Debian package the way README tells an operator, runs it as the
//! systemd service with native XDP in front of a web server, and the node exporter (the guest
//! kernel's TCP counters). A real Prometheus server on the host side scrapes both over the tap
//! network.
//!
//! From the host namespace: bounded hping3 floods (SYN with random sources, ACK, FIN, RST,
//! NULL, XMAS, SYN+FIN, fragments) while a client keeps connecting, first against the guest's
//! kernel alone (the baseline), then with tcpguard. The figures come from Prometheus's query
//! API and are checked against what tcpguard itself reports. Every guest runs, even after one
//! failed; then all guests' figures are printed side by side.
//!
//! The Prometheus server loads the alerting rules the package installs, and the test checks
//! the dashboard the package installs against it: during the floods every panel's query
//! returns data, and the attack alert fires during the SYN flood and ends after the floods.
//!
//! Usage: vm-test PACKAGE (NAME COOKIE_MODE TC_ATTACH IMAGE_DIR)... where COOKIE_MODE (own or
//! kernel) and TC_ATTACH (tcx or netlink) are what tcpguard must choose on that guest's kernel,
//! and IMAGE_DIR holds its vmlinuz, initrd.img and disk.raw.

use std::{
    collections::BTreeMap,
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use tcpguard_tests::{
    monitoring::{self, PanelQuery},
    netns::Namespace,
    rig::{Flood, kernel_counters},
};

const GUEST: &str = "10.202.0.2";
const HOST: &str = "10.202.0.1";
const TAP: &str = "tap0";
const WEB: u16 = 80;
const FLOOD_SECONDS: u32 = 5;
/// The SYN flood is paced, one SYN every 10 µs (hping3's own pause comes on top: it sends
/// some 10 000 to 15 000 a second that way), and runs longer than the others. Paced: at
/// hping3's full rate the tap drops most of what it forwards to the emulated NIC, Prometheus's
/// scrapes of the guest included, and whether one lands during the flood is luck (a run saw
/// none in 10 s). Longer: the attack alert's 1m rate passes its 1000/s once the last minute
/// holds 60 000 unanswered SYNs, some 5 s of this flood, and then a scrape and an evaluation
/// (every 2 s here) must follow while it lasts. The other floods run at full rate.
const SYN_FLOOD_SECONDS: u32 = 20;
const SYN_FLOOD_INTERVAL_US: u32 = 10;
/// The alert that must fire during the SYN flood.
const ATTACK_ALERT: &str = "TcpguardAttack";
/// tcpguard's scrape target, the instance the dashboard is looked at for.
const INSTANCE: &str = "10.202.0.2:9877";
const FLOOD_PACKETS: u32 = 200_000;
/// How long the guest may take to boot and set itself up under software emulation.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// (name, hping3 flags, the tcpguard drop or answer reason it must show up under).
const FLOODS: &[(&str, &[&str], &str)] = &[
    (
        "SYN, random sources",
        &["-S", "--rand-source"],
        "syn_cookie_sent",
    ),
    ("ACK", &["-A", "--rand-source"], "cookie_rejected"),
    // An ACK, FIN or not, to a listener must return a cookie.
    ("FIN+ACK", &["-F", "-A", "--rand-source"], "cookie_rejected"),
    ("RST", &["-R", "--rand-source"], "no_connection"),
    ("NULL", &["--rand-source"], "null_flags"),
    ("XMAS", &["-F", "-U", "-P", "--rand-source"], "xmas_flags"),
    ("SYN+FIN", &["-S", "-F", "--rand-source"], "syn_fin"),
    (
        "fragments",
        &["-S", "-f", "-d", "40", "--rand-source"],
        "fragment",
    ),
];

struct Guest {
    /// The dashboard's panel queries, from the dashboard the package installs.
    dashboard: Vec<PanelQuery>,
    qemu: Child,
    web: Child,
    prometheus: Child,
    console: PathBuf,
    _served: PathBuf,
    /// Overlay disk, served files, console log and Prometheus's data, removed at the end.
    work: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        for child in [&mut self.qemu, &mut self.web, &mut self.prometheus] {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.work);
    }
}

/// One guest: its name, what tcpguard must choose there, and its image.
struct Release {
    name: String,
    cookie_mode: String,
    tc_attach: String,
    image: PathBuf,
}

/// A guest's figures: baseline and with tcpguard, and how long it all took.
struct Run {
    baseline: BTreeMap<String, f64>,
    guarded: BTreeMap<String, f64>,
    wall: Duration,
    /// The check that failed once the figures were in, which the table still shows.
    failure: Option<String>,
}

/// What a panic said.
fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: vm-test PACKAGE (NAME COOKIE_MODE TC_ATTACH IMAGE_DIR)...";
    let (package, releases) = args.split_first().expect(usage);
    assert!(!releases.is_empty() && releases.len() % 4 == 0, "{usage}");
    let releases: Vec<Release> = releases
        .chunks(4)
        .map(|chunk| Release {
            name: chunk[0].clone(),
            cookie_mode: chunk[1].clone(),
            tc_attach: chunk[2].clone(),
            image: PathBuf::from(&chunk[3]),
        })
        .collect();
    let started = Instant::now();
    let mut runs = Vec::new();
    for release in &releases {
        println!("\n=== {}", release.name);
        // A guest that fails does not keep the next from running: its panic is reported below.
        let run = std::panic::catch_unwind(|| run_guest(release, Path::new(package)));
        runs.push(run.map_err(panic_text));
    }
    print_side_by_side(&releases, &runs);
    let mut failed = false;
    for (release, run) in releases.iter().zip(&runs) {
        match run.as_ref().map(|run| (run, &run.failure)) {
            Ok((run, None)) => println!("vm-test: {} passed in {:.0?}", release.name, run.wall),
            Ok((_, Some(panic))) | Err(panic) => {
                failed = true;
                println!("vm-test: {} FAILED: {panic}", release.name);
            }
        }
    }
    assert!(!failed, "a guest failed");
    println!("vm-test: passed in {:.0?}", started.elapsed());
}

/// Every figure of every guest in one table: a baseline and a tcpguard column per guest.
fn print_side_by_side(releases: &[Release], runs: &[Result<Run, String>]) {
    let mut header = String::from("\n| |");
    let mut rule = String::from("| --- |");
    for release in releases {
        header.push_str(&format!(
            " {0}: kernel alone | {0}: tcpguard |",
            release.name
        ));
        rule.push_str(" --- | --- |");
    }
    println!("{header}\n{rule}");
    let keys: std::collections::BTreeSet<&String> = runs
        .iter()
        .flatten()
        .flat_map(|run| run.baseline.keys().chain(run.guarded.keys()))
        .collect();
    let show = |figures: &BTreeMap<String, f64>, key: &String| {
        figures
            .get(key)
            .map_or("-".to_owned(), |value| value.to_string())
    };
    for key in keys {
        let mut line = format!("| {key} |");
        for run in runs {
            match run {
                Ok(run) => line.push_str(&format!(
                    " {} | {} |",
                    show(&run.baseline, key),
                    show(&run.guarded, key)
                )),
                Err(_) => line.push_str(" failed | failed |"),
            }
        }
        println!("{line}");
    }
    let mut wall = String::from("| wall time, boot to last check |");
    for run in runs {
        match run {
            Ok(run) => wall.push_str(&format!(" {:.0?} | |", run.wall)),
            Err(_) => wall.push_str(" failed | |"),
        }
    }
    println!("{wall}");
}

/// Boots one guest, floods it without and with tcpguard, and checks it.
fn run_guest(release: &Release, package: &Path) -> Run {
    let (kernel, initrd, disk) = (
        release.image.join("vmlinuz"),
        release.image.join("initrd.img"),
        release.image.join("disk.raw"),
    );
    let (kernel, initrd, disk) = (&kernel, &initrd, &disk);
    let host = Namespace::new("vmh");
    host.run("ip", &["tuntap", "add", TAP, "mode", "tap", "multi_queue"]);
    host.run("ip", &["addr", "add", &format!("{HOST}/24"), "dev", TAP]);
    host.run("ip", &["link", "set", TAP, "up"]);
    let started = Instant::now();
    let guest = boot(&host, kernel, initrd, disk, package);
    wait_for(
        &guest,
        "Prometheus to scrape the guest's node exporter",
        || query(&host, "up{job=\"node\"}").is_some_and(|v| v == 1.0),
    );
    wait_for(&guest, "the guest's web server", || {
        http(&host, &format!("http://{GUEST}:{WEB}/")).is_some()
    });
    println!("vm: guest up in {:.0?}", started.elapsed());

    let baseline = scenario(
        &host,
        &guest,
        "baseline: the guest's kernel alone",
        &mut |_, _| {},
    );
    // Tell the guest to configure and start tcpguard (the second half of setup.sh).
    fs::write(guest._served.join("phase2"), "go\n").unwrap();
    wait_for(&guest, "tcpguard's metrics", || {
        http(&host, &format!("http://{GUEST}:9877/metrics")).is_some()
    });
    wait_for(&guest, "Prometheus to scrape tcpguard", || {
        query(&host, "up{job=\"tcpguard\"}").is_some_and(|v| v == 1.0)
    });
    // The setup script goes on after tcpguard answers: `systemd-analyze security` alone took
    // longer than Prometheus's first scrape in a CI run, and its rating was not on the console.
    wait_for(
        &guest,
        "the guest's setup script to print its checks",
        || fs::read_to_string(&guest.console).is_ok_and(|console| console.contains(CHECKS_PRINTED)),
    );
    // The unit as the guest's systemd runs it: its own user, three capabilities (CAP_NET_ADMIN
    // is bit 12, CAP_PERFMON 38, CAP_BPF 39), and the guest systemd's rating.
    let console = fs::read_to_string(&guest.console).unwrap_or_default();
    let said = |what: &str| {
        console
            .lines()
            .find(|line| line.contains(what))
            .map(str::trim)
            .unwrap_or_else(|| panic!("the guest did not say {what:?}"))
            .to_owned()
    };
    let identity = said("vm-setup: tcpguard runs as");
    println!("{identity}");
    assert!(
        identity.contains("runs as tcpguard with CapEff: 000000c000001000"),
        "{identity}"
    );
    println!("{}", said("Overall exposure level for tcpguard.service"));
    // Debian 13's 6.12 kernel has bpf_sk_assign_tcp_reqsk and TCX: tcpguard must run its own
    // cookies there, not fall back to the kernel's. Debian 12's 6.1 has neither: the kernel's
    // cookies, and TC through netlink.
    let mode = format!("tcpguard_cookie_mode{{mode=\"{}\"}}", release.cookie_mode);
    let chosen = query(&host, &mode);
    println!("vm: {mode} = {chosen:?}");
    assert_eq!(
        chosen,
        Some(1.0),
        "tcpguard answers with the {} cookies in the guest",
        release.cookie_mode
    );
    check_tc_attach(&guest, &release.tc_attach);
    let mut attack_seen = None;
    let mut empty_panels = Vec::new();
    let guarded = scenario(&host, &guest, "with tcpguard", &mut |flood, ends| {
        if flood == FLOODS[0].0 {
            let started = Instant::now();
            while attack_seen.is_none() && Instant::now() < ends {
                if query_all(&host, &firing_query(ATTACK_ALERT)).is_some_and(|s| !s.is_empty()) {
                    attack_seen = Some(started.elapsed());
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        } else if flood == FLOODS[FLOODS.len() - 1].0 {
            // The last flood: every reason's rate window holds the floods before it.
            empty_panels = evaluate_dashboard(&host, &guest.dashboard);
        }
    });

    // Checked once the figures are in, so that the table shows them when a check fails.
    let checks = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(
            baseline["node_netstat_TcpExt_SyncookiesSent"] > 0.0,
            "the baseline flood did not even make the guest's kernel send cookies"
        );
        check(&host, &guarded);
        println!(
            "vm: {ATTACK_ALERT} firing {} into the {SYN_FLOOD_SECONDS} s SYN flood",
            attack_seen.map_or("never".to_owned(), |after| format!("{after:.1?}"))
        );
        assert!(
            attack_seen.is_some(),
            "{ATTACK_ALERT} did not fire during the SYN flood"
        );
        assert!(
            empty_panels.is_empty(),
            "dashboard queries returned no data during the floods:\n{}",
            empty_panels.join("\n")
        );
        // After the floods, the attack alert resolves once its 1m rate window holds no flood.
        let floods_over = Instant::now();
        let deadline = floods_over + Duration::from_secs(180);
        // An answer without the alert, not a failed query, is what ends the wait.
        while query_all(&host, &firing_query(ATTACK_ALERT)).is_none_or(|series| !series.is_empty())
        {
            assert!(
                Instant::now() < deadline,
                "{ATTACK_ALERT} still fires 3 minutes after the floods"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        println!(
            "vm: {ATTACK_ALERT} resolved {:.0?} after the checks that follow the floods",
            floods_over.elapsed()
        );
    }));
    Run {
        baseline,
        guarded,
        wall: started.elapsed(),
        failure: checks.err().map(panic_text),
    }
}

/// What the guest's setup script printed on the console: `tcpguard status` names the TC mode,
/// and the guest's own `tc` lists tcpguard's egress filter exactly when it is attached through
/// netlink.
fn check_tc_attach(guest: &Guest, expected: &str) {
    let console = fs::read_to_string(&guest.console).unwrap_or_default();
    let status = console
        .lines()
        .filter_map(|line| line.split("vm-setup: status: ").nth(1))
        // The shell's trace of the command that prints it has the prefix too.
        .find(|status| status.starts_with("TC egress"))
        .unwrap_or_else(|| panic!("the guest printed no tcpguard status:\n{console}"));
    println!("vm: {status}");
    assert!(
        status.starts_with(&format!("TC egress: {expected} (")),
        "TC egress is not attached through {expected}: {status}"
    );
    let filters: Vec<&str> = console
        .lines()
        .filter_map(|line| line.split("vm-setup: tc: ").nth(1))
        .collect();
    // tcpguard's netlink filter: its priority, its program.
    let priority = format!("pref {} bpf", tcpguard::tc::PRIORITY);
    let listed = filters
        .iter()
        .any(|line| line.contains(&priority) && line.contains("tcpguard_egress"));
    // What the console shows from the status line on, the shell's trace and stderr included.
    let around = console
        .find("vm-setup: status: TC egress")
        .map_or("", |start| &console[start..]);
    let around: String = around.lines().take(12).collect::<Vec<_>>().join("\n");
    assert_eq!(
        listed,
        expected == "netlink",
        "the guest's tc lists these egress filters: {filters:#?}\nthe console there:\n{around}"
    );
}

fn boot(host: &Namespace, kernel: &Path, initrd: &Path, disk: &Path, package: &Path) -> Guest {
    let work = std::env::temp_dir().join(format!("tcpguard-vm-{}", std::process::id()));
    let served = work.join("www");
    fs::create_dir_all(&served).unwrap();
    fs::copy(package, served.join("tcpguard.deb")).unwrap();
    fs::write(served.join("setup.sh"), SETUP).unwrap();
    // The dashboard and the rules, from where the package installs them (README says so).
    let unpacked = work.join("package");
    tcpguard_tests::netns::run(
        "dpkg-deb",
        &["-x", package.to_str().unwrap(), unpacked.to_str().unwrap()],
    );
    let shipped = |name: &str| {
        let path = unpacked.join("usr/share/tcpguard").join(name);
        assert!(
            path.exists(),
            "the package does not install /usr/share/tcpguard/{name}"
        );
        path
    };
    let rules = shipped(monitoring::ALERTS);
    let dashboard: Value =
        serde_json::from_str(&fs::read_to_string(shipped(monitoring::DASHBOARD)).unwrap())
            .expect("the shipped dashboard is JSON");
    let dashboard = monitoring::panel_queries(&dashboard);
    let overlay = work.join("overlay.qcow2");
    tcpguard_tests::netns::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            disk.to_str().unwrap(),
            overlay.to_str().unwrap(),
        ],
    );
    let web = host
        .command("python3")
        .args(["-m", "http.server", "8000", "--bind", HOST, "--directory"])
        .arg(&served)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let prometheus_config = work.join("prometheus.yml");
    fs::write(
        &prometheus_config,
        format!(
            "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n  evaluation_interval: 2s\n\
             rule_files: ['{}']\nscrape_configs:\n\
             \x20 - job_name: tcpguard\n    static_configs: [{{targets: ['{GUEST}:9877']}}]\n\
             \x20 - job_name: node\n    static_configs: [{{targets: ['{GUEST}:9100']}}]\n",
            rules.display()
        ),
    )
    .unwrap();
    let prometheus = host
        .command("prometheus")
        .arg(format!("--config.file={}", prometheus_config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            work.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={HOST}:9090"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting prometheus (installed by `cargo xtask setup`)");
    let console = work.join("console.log");
    let qemu = host
        .command("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "1536"])
        .args(["-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1",
        ])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname={TAP},script=no,downscript=no,queues=4"),
            "-device",
            // Native XDP on virtio_net needs the guest offloads off, and, for XDP_TX without
            // a lock, a queue pair per CPU beside the stack's own.
            "virtio-net-pci,netdev=n0,mq=on,vectors=10,guest_tso4=off,guest_tso6=off,guest_ecn=off,guest_ufo=off,guest_csum=off",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting qemu-system-x86_64 (installed by `cargo xtask setup`)");
    Guest {
        dashboard,
        qemu,
        web,
        prometheus,
        console,
        _served: served,
        work,
    }
}

/// Floods one after the other while a client keeps connecting; returns the guest's figures.
/// `during` runs while each flood does, with the flood's name and when it ends at the latest.
fn scenario(
    host: &Namespace,
    guest: &Guest,
    name: &str,
    during: &mut dyn FnMut(&str, Instant),
) -> BTreeMap<String, f64> {
    println!("\n== {name}");
    let before = guest_counters(host);
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        host.spawn(move || {
            let (mut ok, mut failed, mut retries, mut latencies) = (0u32, 0u32, 0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                // Up to three tries: a try lost to the emulated NIC dropping packets under the
                // flood is retried, and counted.
                let start = Instant::now();
                let connected = (0..3).any(|attempt| {
                    if attempt > 0 {
                        retries += 1;
                    }
                    TcpStream::connect_timeout(
                        &SocketAddr::from(([10, 202, 0, 2], WEB)),
                        Duration::from_secs(5),
                    )
                    .is_ok()
                });
                if connected {
                    ok += 1;
                    latencies.push(start.elapsed());
                } else {
                    failed += 1;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            latencies.sort();
            (ok, failed, retries, latencies)
        })
    };
    let retrans_before = kernel_counters(host)["TcpExtTCPSynRetrans"] as f64;
    let tap_drops_before = tap_tx_dropped(host);
    let mut sent = 0.0;
    let cookies = || guest_counters(host)["node_netstat_TcpExt_SyncookiesSent"];
    let start_cookies = cookies();
    std::thread::sleep(Duration::from_secs(8));
    println!(
        "  clients alone for 8 s: the guest's kernel sent {} cookies",
        cookies() - start_cookies
    );
    for (flood, flags, _) in FLOODS {
        print!("  flood {flood} ... ");
        let before = cookies();
        let (seconds, running) = if *flood == FLOODS[0].0 {
            let paced = Flood::paced_to(
                host,
                GUEST,
                flags,
                WEB,
                SYN_FLOOD_SECONDS,
                SYN_FLOOD_INTERVAL_US,
            );
            (SYN_FLOOD_SECONDS, paced)
        } else {
            let full = Flood::start_to(host, GUEST, flags, WEB, FLOOD_SECONDS, FLOOD_PACKETS);
            (FLOOD_SECONDS, full)
        };
        during(flood, Instant::now() + Duration::from_secs(seconds.into()));
        running.wait();
        sent += 1.0;
        println!(
            "done; the guest's kernel sent {} cookies",
            cookies() - before
        );
        if guest.qemu_exited() {
            panic!("qemu exited; console in {}", guest.console.display());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed, retries, latencies) = client.join().unwrap();
    let tap_drops = tap_tx_dropped(host) - tap_drops_before;
    let retransmits = kernel_counters(host)["TcpExtTCPSynRetrans"] as f64 - retrans_before;
    // Three scrape intervals: the last counts are in Prometheus.
    std::thread::sleep(Duration::from_secs(6));
    let after = guest_counters(host);
    let mut figures = BTreeMap::new();
    for (name, value) in &after {
        figures.insert(
            name.clone(),
            value - before.get(name).copied().unwrap_or(0.0),
        );
    }
    let p99 = latencies
        .get(((latencies.len() as f64 - 1.0) * 0.99).round() as usize)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    figures.insert("client connects ok".into(), f64::from(ok));
    figures.insert("client connects failed".into(), f64::from(failed));
    figures.insert("client connect retries".into(), f64::from(retries));
    figures.insert("client SYN retransmits".into(), retransmits);
    figures.insert(
        "packets the tap could not hand to the emulated NIC".into(),
        tap_drops,
    );
    figures.insert("client connect p99 ms".into(), (p99 * 10.0).round() / 10.0);
    figures.insert("floods".into(), sent);
    figures
}

/// The guest's kernel TCP counters and tcpguard's verdict counters, through Prometheus, once
/// it holds samples from the last few seconds (a scrape may time out while a flood saturates
/// the emulated guest, and an older sample would blur one phase into the next).
fn guest_counters(host: &Namespace) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let age = |series: &str| query(host, &format!("time() - timestamp({series})"));
    // The node exporter's series must be there and fresh (absent means its last scrape
    // failed); tcpguard's only while it runs.
    while !(age("node_netstat_TcpExt_SyncookiesSent").is_some_and(|age| age < 3.0)
        && age("tcpguard_build_info").is_none_or(|age| age < 3.0))
    {
        assert!(Instant::now() < deadline, "Prometheus has no fresh samples");
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut counters = BTreeMap::new();
    for series in [
        "node_netstat_TcpExt_SyncookiesSent",
        "node_netstat_TcpExt_SyncookiesRecv",
        "node_netstat_TcpExt_ListenOverflows",
        "node_netstat_TcpExt_ListenDrops",
        "node_netstat_Tcp_OutRsts",
    ] {
        counters.insert(series.to_owned(), query(host, series).unwrap_or(0.0));
    }
    for (flood, _, reason) in FLOODS {
        let series = format!("sum(tcpguard_xdp_packets_total{{reason=\"{reason}\"}})");
        counters.insert(
            format!("tcpguard {reason} ({flood})"),
            query(host, &series).unwrap_or(0.0),
        );
    }
    // What passed to the guest's kernel, by reason, as tcpguard itself reports it.
    let own = http(host, &format!("http://{GUEST}:9877/metrics")).unwrap_or_default();
    for line in own.lines().filter(|line| {
        line.starts_with("tcpguard_xdp_packets_total") && line.contains("verdict=\"pass\"")
    }) {
        let reason = line
            .split("reason=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or("?");
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        counters.insert(format!("tcpguard passed: {reason}"), value);
    }
    for result in [
        "assigned",
        "kernel_socket",
        "no_listener",
        "refused",
        "unparsed",
    ] {
        let series = format!("sum(tcpguard_cookie_handovers_total{{result=\"{result}\"}})");
        if let Some(value) = query(host, &series) {
            counters.insert(format!("tcpguard cookie handovers: {result}"), value);
        }
    }
    counters
}

/// With tcpguard: the guest's kernel made no cookies and never overflowed, every flood was
/// counted under its reason, every client connected, and Prometheus holds what tcpguard says.
fn check(host: &Namespace, guarded: &BTreeMap<String, f64>) {
    assert_eq!(
        guarded["node_netstat_TcpExt_SyncookiesSent"], 0.0,
        "the guest's kernel made cookies"
    );
    assert_eq!(
        guarded["node_netstat_TcpExt_ListenOverflows"], 0.0,
        "the listener overflowed"
    );
    assert_eq!(
        guarded["client connects failed"], 0.0,
        "a client could not connect"
    );
    assert!(guarded["client connects ok"] >= 10.0);
    for (flood, _, reason) in FLOODS {
        assert!(
            guarded[&format!("tcpguard {reason} ({flood})")] > 100.0,
            "the {flood} flood is not counted under {reason}: {guarded:#?}"
        );
    }
    // Prometheus's values are tcpguard's own: read tcpguard's /metrics, let Prometheus scrape
    // twice, read it again; what Prometheus holds lies between the two readings (late segments
    // of closing connections may still move a counter).
    let own =
        |reason: &str| -> f64 {
            // Five tries, 5 s apart: right after the floods a new connection to the emulated
            // guest can go unanswered for one request's 10 s, or for all of three tries (once;
            // the cause is not found yet, and Prometheus's kept-alive scrapes go on). Each
            // failed try is printed with curl's error.
            let url = format!("http://{GUEST}:9877/metrics");
            let mut failures = Vec::new();
            let text = (0..5)
            .find_map(|try_number| {
                if try_number > 0 {
                    std::thread::sleep(Duration::from_secs(5));
                }
                let answer = http_or_error(host, &url);
                if let Err(error) = &answer {
                    println!("vm: {url}: {error}");
                    failures.push(error.clone());
                }
                answer.ok()
            })
            .unwrap_or_else(|| {
                // Whether the guest answers new connections at all: its web server (also
                // protected) and its node exporter.
                let others: Vec<String> = [80, 9100]
                    .iter()
                    .map(|port| {
                        let other = format!("http://{GUEST}:{port}/");
                        format!("{other}: {:?}", http_or_error(host, &other).map(|_| "answered"))
                    })
                    .collect();
                panic!(
                    "tcpguard's /metrics answers within five tries: {failures:?}; then {others:?}"
                )
            });
            text.lines()
                .filter(|line| {
                    line.starts_with("tcpguard_xdp_packets_total")
                        && line.contains(&format!("reason=\"{reason}\""))
                })
                .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
    for (_, _, reason) in FLOODS {
        let before = own(reason);
        std::thread::sleep(Duration::from_secs(5));
        let scraped = query(
            host,
            &format!("sum(tcpguard_xdp_packets_total{{reason=\"{reason}\"}})"),
        )
        .unwrap();
        let after = own(reason);
        assert!(
            before <= scraped && scraped <= after,
            "Prometheus holds {scraped} for {reason}, tcpguard said {before} then {after}"
        );
    }
    let mode = query(host, "count(tcpguard_build_info)").unwrap_or(0.0);
    assert_eq!(mode, 1.0);
}

/// One instant value from Prometheus's query API.
fn query(host: &Namespace, expression: &str) -> Option<f64> {
    query_all(host, expression)?
        .first()
        .map(|(_, value)| *value)
}

/// Every series of an instant query's result: its labels and value (NaN included).
fn query_all(host: &Namespace, expression: &str) -> Option<Vec<(Value, f64)>> {
    let output = host
        .command("curl")
        .args(["-sf", "--max-time", "10", "-G"])
        .arg(format!("http://{HOST}:9090/api/v1/query"))
        .arg("--data-urlencode")
        .arg(format!("query={expression}"))
        .output()
        .ok()?;
    let answer: Value = serde_json::from_slice(&output.stdout).ok()?;
    answer["data"]["result"]
        .as_array()?
        .iter()
        .map(|series| {
            Some((
                series["metric"].clone(),
                series["value"][1].as_str()?.parse().ok()?,
            ))
        })
        .collect()
}

/// The series of `alert` that are firing.
fn firing_query(alert: &str) -> String {
    format!("ALERTS{{alertname=\"{alert}\",alertstate=\"firing\"}}")
}

/// Runs every query of the dashboard as Grafana would for tcpguard's instance (a 1m rate
/// window: four of this Prometheus's 2 s scrape intervals would do, and Grafana's default
/// scrape interval of 15 s makes it 1m); returns those that gave no number, by panel.
fn evaluate_dashboard(host: &Namespace, queries: &[PanelQuery]) -> Vec<String> {
    let mut empty = Vec::new();
    for query in queries {
        let expr = monitoring::substitute(&query.expr, INSTANCE, "1m", "1h");
        let result = query_all(host, &expr).unwrap_or_default();
        let numbers = result.iter().filter(|(_, value)| value.is_finite()).count();
        println!(
            "  panel {:?} ({}): {numbers} of {} series with a number",
            query.panel,
            query.legend,
            result.len()
        );
        if numbers == 0 {
            empty.push(format!(
                "panel {:?}, query {:?}: {expr}",
                query.panel, query.legend
            ));
        }
    }
    empty
}

/// Every series of a query's result, by the value of `label`.
fn http(host: &Namespace, url: &str) -> Option<String> {
    http_or_error(host, url).ok()
}

/// The body at `url`, or curl's exit status and error.
fn http_or_error(host: &Namespace, url: &str) -> Result<String, String> {
    let output = host
        .command("curl")
        .args(["-sSf", "--max-time", "10", url])
        .output()
        .map_err(|err| format!("cannot run curl: {err}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{} ({})",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Packets the host's tap dropped because qemu's NIC did not take them in time.
fn tap_tx_dropped(host: &Namespace) -> f64 {
    let output = host.run("ip", &["-j", "-s", "link", "show", TAP]);
    let json: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    json[0]["stats64"]["tx"]["dropped"].as_f64().unwrap_or(0.0)
}

impl Guest {
    fn qemu_exited(&self) -> bool {
        // SAFETY: signal 0 only probes the pid of the qemu this test started.
        unsafe { libc::kill(self.qemu.id() as i32, 0) != 0 }
    }
}

fn wait_for(guest: &Guest, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while !ready() {
        let setup_failed = fs::read_to_string(&guest.console)
            .is_ok_and(|console| console.contains("vm-setup: failed"));
        if Instant::now() > deadline || guest.qemu_exited() || setup_failed {
            let console = fs::read_to_string(&guest.console).unwrap_or_default();
            // tcpguard's journal, when the setup script printed it, else the console's end.
            let shown = match console.rfind(JOURNAL_MARKER) {
                Some(start) => console[start..].to_owned(),
                None => {
                    let tail: Vec<&str> = console.lines().rev().take(60).collect();
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                }
            };
            panic!("timed out waiting for {what}; the guest's console:\n{shown}");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// What the setup script prints on the console last, once tcpguard runs and its checks are
/// printed.
const CHECKS_PRINTED: &str = "vm-setup: checks printed";

/// What the setup script prints on the console before tcpguard's journal, when tcpguard did not
/// start.
const JOURNAL_MARKER: &str = "vm-setup: tcpguard's journal follows";

/// Run by the guest at boot (vm-setup.service): the first half sets up the web server and
/// Prometheus; the second, once the host has taken its baseline, installs and configures
/// tcpguard as README says. tcpguard protects every port the host reaches (the web server,
/// the node exporter, its own metrics), and nothing in the guest connects over loopback: with
/// `tcp_syncookies = 2` the guest's kernel answers any SYN to an unprotected listener with a
/// cookie of its own, and the test could not tell those from flood cookies.
const SETUP: &str = r#"set -eu
cd /root
# Under software emulation a full node exporter scrape takes seconds: only the TCP counters.
# Prometheus itself runs on the host side and scrapes over the tap network.
echo 'ARGS="--collector.disable-defaults --collector.netstat"' > /etc/default/prometheus-node-exporter
systemctl disable --now prometheus
systemctl restart prometheus-node-exporter
# The web server, with a listen backlog of 511 as nginx's and Apache's: `python3 -m http.server`
# listens with 5, and under emulation on a busy host its accept queue overflowed.
systemd-run --unit=web --property=Restart=always python3 -c 'import functools, http.server as s
s.ThreadingHTTPServer.request_queue_size = 511
handler = functools.partial(s.SimpleHTTPRequestHandler, directory="/usr/share/doc")
s.test(handler, s.ThreadingHTTPServer, port=80)'
curl -fsS -o tcpguard.deb http://10.202.0.1:8000/tcpguard.deb
dpkg -i tcpguard.deb
until curl -fsS http://10.202.0.1:8000/phase2 >/dev/null; do sleep 1; done
sed -i -e 's/^# interface = "eth0"/interface = "eth0"/' \
       -e 's/^# ports = \[80, 443\]/ports = [80, 9100, 9877]/' \
       -e 's/^# xdp_mode = "auto"/xdp_mode = "native"/' \
       -e 's/^# cookies = "auto"/cookies = "always"/' \
       -e 's/^# listen = "127.0.0.1:9877"/listen = "0.0.0.0:9877"/' /etc/tcpguard/tcpguard.toml
tcpguard check-config
if ! systemctl restart tcpguard; then
    # Straight to the serial console: journald rate-limits what it forwards. Without the
    # shell's trace, which would interleave with it there.
    set +x
    sleep 2
    echo "vm-setup: tcpguard's journal follows" > /dev/ttyS0
    # Without the verifier's trace of instructions, states and source lines: on a rejection
    # it can run to megabytes, cut short where the log buffer ended, and what it says (the
    # error, how many instructions were processed) is in the lines around it.
    journalctl -u tcpguard -b --no-pager -o cat \
        | grep -v -E '^([0-9]+: |; |from [0-9]+ to |last_idx |regs=|parent |mark_precise|[0-9]+: R)' \
        | tail -n 40 > /dev/ttyS0 2>&1
    # And the last lines of the verifier's log that tcpguard's error quotes, instructions too.
    journalctl -u tcpguard -b --no-pager -o cat | grep -m 1 -A 26 'rejected program' > /dev/ttyS0 2>&1
    echo "vm-setup: failed" > /dev/ttyS0
    exit 1
fi
systemctl is-active tcpguard
# What follows goes straight to the console for the host to check, without the shell's trace:
# journald forwards the trace later, and it would show each line before the line itself.
set +x
# As README says: the service's own user, its three capabilities and nothing else, and
# systemd's rating of the installed unit at 2.0 or better (the threshold is in tenths).
pid=$(systemctl show -p MainPID --value tcpguard)
echo "vm-setup: tcpguard runs as $(stat -c %U "/proc/$pid") with $(grep CapEff "/proc/$pid/status" | tr -s '\t' ' ')" > /dev/ttyS0
if ! systemd-analyze security --threshold=20 tcpguard.service > security.txt 2>&1; then
    tail -n 40 security.txt > /dev/ttyS0
    echo "vm-setup: failed: systemd-analyze rates tcpguard.service above 2.0" > /dev/ttyS0
    exit 1
fi
echo "vm-setup: $(grep 'Overall exposure' security.txt)" > /dev/ttyS0
tcpguard status | grep '^TC egress' | sed 's/^/vm-setup: status: /' > /dev/ttyS0
tc filter show dev eth0 egress | sed 's/^/vm-setup: tc: /' > /dev/ttyS0
echo "vm-setup: checks printed" > /dev/ttyS0
"#;
