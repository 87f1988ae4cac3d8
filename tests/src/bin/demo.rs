//! `cargo xtask demo`: a web server in one network namespace, protected by tcpguard; a client in
//! another that keeps fetching a page; a bounded hping3 SYN flood in between. Prints tcpguard's
//! live counters and the client's success and latency, then a summary, and removes everything.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tcpguard_tests::rig::{Daemon, Flood, Rig, SERVER, kernel_counters};

const PORT: u16 = 8080;
const QUIET: Duration = Duration::from_secs(4);
const FLOOD_SECONDS: u32 = 10;
const FLOOD_PACKETS: u32 = 3_000_000;

#[derive(Default)]
struct Phase {
    latencies: Vec<Duration>,
    failures: u32,
}

fn main() {
    println!("tcpguard demo: setting up a server and a client namespace joined by veth");
    let rig = Rig::new();
    let mut web = rig
        .server
        .command("python3")
        .args([
            "-m",
            "http.server",
            &PORT.to_string(),
            "--bind",
            &SERVER.to_string(),
        ])
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting python3 -m http.server");
    let mut daemon = Daemon::start(
        &rig.server,
        &["--iface", "srv0", "--port", "8080", "--stats-interval", "1"],
    );
    for line in daemon.drain().iter().chain(daemon.log.iter().take(3)) {
        println!("  tcpguard | {line}");
    }
    wait_for_web_server(&rig);

    let phases: Arc<Mutex<[Phase; 3]>> = Arc::default();
    let current = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (phases, current, stop) = (phases.clone(), current.clone(), stop.clone());
        rig.client.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let result = fetch_page();
                let phase = *current.lock().unwrap();
                let mut phases = phases.lock().unwrap();
                match result {
                    Some(took) => phases[phase].latencies.push(took),
                    None => phases[phase].failures += 1,
                }
                drop(phases);
                thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let kernel_before = kernel_counters(&rig.server);
    println!("\n== {}s without a flood", QUIET.as_secs());
    watch(&mut daemon, &phases, 0, QUIET);
    println!(
        "\n== hping3 -S --flood --rand-source for at most {FLOOD_SECONDS}s / {FLOOD_PACKETS} packets"
    );
    *current.lock().unwrap() = 1;
    let flood = Flood::start(
        &rig.client,
        &["-S", "--rand-source"],
        PORT,
        FLOOD_SECONDS,
        FLOOD_PACKETS,
    );
    watch(
        &mut daemon,
        &phases,
        1,
        Duration::from_secs(u64::from(FLOOD_SECONDS)),
    );
    flood.wait();
    println!("\n== {}s after the flood", QUIET.as_secs());
    *current.lock().unwrap() = 2;
    watch(&mut daemon, &phases, 2, QUIET);
    let kernel_after = kernel_counters(&rig.server);
    let status = daemon.paths.tcpguard(&["status"]);
    println!(
        "\n== `tcpguard status`, as an operator would ask it\n{}",
        String::from_utf8_lossy(&status.stdout)
    );

    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let totals = daemon.stop();
    let _ = web.kill();
    let _ = web.wait();

    println!("\n== summary");
    let phases = phases.lock().unwrap();
    for (name, phase) in ["before", "during the flood", "after"]
        .iter()
        .zip(phases.iter())
    {
        let mut sorted = phase.latencies.clone();
        sorted.sort();
        let quantile = |q: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
                .map_or("-".to_owned(), |d| {
                    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
                })
        };
        println!(
            "client {name:>16}: {} pages fetched, {} failed, latency p50 {} p99 {}",
            sorted.len(),
            phase.failures,
            quantile(0.5),
            quantile(0.99)
        );
    }
    let kernel = |name: &str| {
        kernel_after.get(name).copied().unwrap_or(0) - kernel_before.get(name).copied().unwrap_or(0)
    };
    println!(
        "server kernel: TcpExtSyncookiesSent +{} (cookies it had to make itself), \
         TcpExtSyncookiesRecv +{} (connections built from the kernel's cookies; tcpguard's own \
         cookies are counted as cookie_accepted below), TcpExtListenOverflows +{}",
        kernel("TcpExtSyncookiesSent"),
        kernel("TcpExtSyncookiesRecv"),
        kernel("TcpExtListenOverflows")
    );
    println!("tcpguard totals:");
    for (name, value) in totals {
        println!("  {name:>22} {value}");
    }
    println!("\nnamespaces, veth and XDP programs removed");
}

fn wait_for_web_server(rig: &Rig) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.client.within(fetch_page).is_none() {
        assert!(Instant::now() < deadline, "the web server did not start");
        thread::sleep(Duration::from_millis(100));
    }
}

/// One HTTP GET of the server's index page; its latency, or None if it failed.
fn fetch_page() -> Option<Duration> {
    let started = Instant::now();
    let address = SocketAddr::from((SERVER, PORT));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(3)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: demo\r\n\r\n")
        .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    response
        .starts_with(b"HTTP/1.0 200")
        .then(|| started.elapsed())
}

/// Prints tcpguard's log lines and the client's progress once a second for `period`.
fn watch(daemon: &mut Daemon, phases: &Mutex<[Phase; 3]>, phase: usize, period: Duration) {
    let end = Instant::now() + period;
    while Instant::now() < end {
        thread::sleep(Duration::from_secs(1));
        for line in daemon.drain() {
            println!("  tcpguard | {line}");
        }
        let phases = phases.lock().unwrap();
        println!(
            "  client   | {} pages fetched, {} failed so far in this phase",
            phases[phase].latencies.len(),
            phases[phase].failures
        );
    }
}
