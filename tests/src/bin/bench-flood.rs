//! What a SYN flood costs the protected host, and what it does to real clients, with the
//! kernel's own defence (`tcp_syncookies = 2`, no XDP) and with tcpguard, measured side by side
//! in one run over the same veth rig.
//!
//! Cost: softirq CPU time (from /proc/stat, the whole machine) per SYN answered with a cookie.
//! Both the kernel's SYN handling and the XDP program run in softirq; so does the client
//! namespace's receipt of the SYN-ACKs, which is the same in both cases since the server
//! routes every SYN-ACK back over the veth. Generator: hping3 (one thread), whose own count
//! gives the rate offered.
//!
//! Clients: connect() from the client namespace every 20 ms, timed, before and during the
//! flood.

use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tcpguard_tests::{
    netns::Namespace,
    rig::{CLIENT, Daemon, Rig, SERVER, SERVER_IF, kernel_counters},
};

const PORT: u16 = 8080;
const FLOOD_SECONDS: u32 = 10;
const FLOOD_PACKETS: u32 = 5_000_000;
const IDLE: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Defence {
    Kernel,
    Tcpguard,
}

impl Defence {
    fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel SYN cookies (tcp_syncookies=2)",
            Self::Tcpguard => "tcpguard (XDP cookies)",
        }
    }
}

#[derive(Default)]
struct Clients {
    latencies: Vec<Duration>,
    failures: usize,
}

impl Clients {
    fn quantile(&self, q: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        sorted
            .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    }

    fn success(&self) -> f64 {
        let total = self.latencies.len() + self.failures;
        100.0 * self.latencies.len() as f64 / total.max(1) as f64
    }
}

struct Run {
    defence: Defence,
    idle: Clients,
    flood: Clients,
    sent: u64,
    answered: u64,
    softirq_seconds: f64,
    seconds: f64,
}

fn main() {
    let runs: Vec<Run> = [Defence::Kernel, Defence::Tcpguard]
        .into_iter()
        .map(run)
        .collect();
    let mut report = String::new();
    let kernel = &runs[0];
    writeln!(
        report,
        "SYN flood over veth, {FLOOD_SECONDS} s of hping3 -S --flood --rand-source (one thread) per defence, same rig:\n"
    )
    .unwrap();
    writeln!(
        report,
        "| defence | SYNs offered/s (hping3) | SYNs answered | softirq CPU per SYN answered | × kernel |"
    )
    .unwrap();
    writeln!(report, "| --- | --- | --- | --- | --- |").unwrap();
    for run in &runs {
        writeln!(
            report,
            "| {} | {:.0} k | {} | {:.0} ns | {:.2} |",
            run.defence.name(),
            run.sent as f64 / run.seconds / 1000.0,
            run.answered,
            run.cost_ns(),
            run.cost_ns() / kernel.cost_ns()
        )
        .unwrap();
    }
    writeln!(
        report,
        "\nClients (connect() every 20 ms from the client namespace):\n\n| defence | phase | connects | success | p50 | p99 |\n| --- | --- | --- | --- | --- | --- |"
    )
    .unwrap();
    for run in &runs {
        for (phase, clients) in [("idle", &run.idle), ("flood", &run.flood)] {
            writeln!(
                report,
                "| {} | {phase} | {} | {:.1}% | {:.2} ms | {:.2} ms |",
                run.defence.name(),
                clients.latencies.len() + clients.failures,
                clients.success(),
                clients.quantile(0.5),
                clients.quantile(0.99)
            )
            .unwrap();
        }
    }
    print!("{report}");
    if let Some(path) = std::env::args().nth(1) {
        std::fs::write(&path, plot(&runs)).expect("writing the plot");
        eprintln!("plot written to {path}");
    }
}

impl Run {
    fn cost_ns(&self) -> f64 {
        self.softirq_seconds * 1e9 / self.answered.max(1) as f64
    }
}

fn run(defence: Defence) -> Run {
    eprintln!("== {}", defence.name());
    let rig = Rig::new();
    // Every SYN-ACK goes back over the veth, whoever answers, so that both defences pay the
    // same to deliver it.
    rig.server.run(
        "ip",
        &["route", "add", "default", "via", &CLIENT.to_string()],
    );
    rig.server.sysctl("net.ipv4.tcp_syncookies", "2");
    rig.server.sysctl("net.ipv4.tcp_timestamps", "2");
    let listener = rig
        .server
        .within(|| TcpListener::bind(("0.0.0.0", PORT)).unwrap());
    std::thread::spawn(move || for _ in listener.incoming() {});
    let daemon = (defence == Defence::Tcpguard).then(|| {
        Daemon::start(
            &rig.server,
            &[
                "--iface",
                SERVER_IF,
                "--port",
                "8080",
                "--stats-interval",
                "0",
            ],
        )
    });

    let idle = measure_clients(&rig.client, IDLE);
    let kernel_before = kernel_counters(&rig.server);
    let softirq_before = softirq_seconds();
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = {
        let stop = stop.clone();
        rig.client.spawn(move || {
            let mut clients = Clients::default();
            while !stop.load(Ordering::Relaxed) {
                connect_once(&mut clients);
            }
            clients
        })
    };
    let sent = flood(&rig.client);
    let seconds = start.elapsed().as_secs_f64();
    let softirq = softirq_seconds() - softirq_before;
    stop.store(true, Ordering::Relaxed);
    let flood_clients = clients.join().unwrap();
    let kernel_after = kernel_counters(&rig.server);
    let answered = match daemon {
        Some(daemon) => daemon
            .stop()
            .into_iter()
            .find(|(name, _)| name == "syn_cookie_sent")
            .map_or(0, |(_, value)| value),
        None => kernel_after["TcpExtSyncookiesSent"] - kernel_before["TcpExtSyncookiesSent"],
    };
    Run {
        defence,
        idle,
        flood: flood_clients,
        sent,
        answered,
        softirq_seconds: softirq,
        seconds,
    }
}

fn measure_clients(client: &Namespace, duration: Duration) -> Clients {
    client.within(move || {
        let mut clients = Clients::default();
        let end = Instant::now() + duration;
        while Instant::now() < end {
            connect_once(&mut clients);
        }
        clients
    })
}

fn connect_once(clients: &mut Clients) {
    let start = Instant::now();
    match TcpStream::connect_timeout(&SocketAddr::from((SERVER, PORT)), Duration::from_secs(3)) {
        Ok(_) => clients.latencies.push(start.elapsed()),
        Err(_) => clients.failures += 1,
    }
    std::thread::sleep(Duration::from_millis(20));
}

/// Floods for FLOOD_SECONDS (or FLOOD_PACKETS) and returns how many SYNs hping3 sent.
fn flood(client: &Namespace) -> u64 {
    let output = client
        .command("timeout")
        .args([
            "-s",
            "INT",
            &FLOOD_SECONDS.to_string(),
            "hping3",
            "-S",
            "--flood",
        ])
        .args(["--rand-source", "-c", &FLOOD_PACKETS.to_string()])
        .args(["-p", &PORT.to_string(), &SERVER.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("running hping3");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    text.lines()
        .find_map(|line| {
            line.split_once(" packets transmitted")
                .and_then(|(count, _)| count.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("hping3 printed no packet count: {text}"))
}

/// Softirq time of the whole machine, from /proc/stat, in seconds.
fn softirq_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu = stat.lines().next().unwrap();
    let softirq: f64 = cpu.split_whitespace().nth(7).unwrap().parse().unwrap();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    softirq / ticks
}

/// Two bar charts as SVG: softirq CPU per SYN answered, and client p99 connect latency.
fn plot(runs: &[Run]) -> String {
    let mut svg = String::from(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"720\" height=\"300\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"720\" height=\"300\" fill=\"white\"/>\n",
    );
    let charts: [(&str, Vec<(String, f64)>); 2] = [
        (
            "softirq CPU per SYN answered (ns)",
            runs.iter()
                .map(|run| (run.defence.name().to_owned(), run.cost_ns()))
                .collect(),
        ),
        (
            "client connect p99 (ms)",
            runs.iter()
                .flat_map(|run| {
                    [
                        (
                            format!("{} idle", short(run.defence)),
                            run.idle.quantile(0.99),
                        ),
                        (
                            format!("{} flood", short(run.defence)),
                            run.flood.quantile(0.99),
                        ),
                    ]
                })
                .collect(),
        ),
    ];
    for (index, (title, bars)) in charts.iter().enumerate() {
        let left = 20.0 + index as f64 * 360.0;
        let max = bars
            .iter()
            .map(|(_, v)| *v)
            .fold(f64::MIN_POSITIVE, f64::max);
        writeln!(
            svg,
            "<text x=\"{left}\" y=\"20\" font-weight=\"bold\">{title}</text>"
        )
        .unwrap();
        let width = 300.0 / bars.len() as f64;
        for (i, (label, value)) in bars.iter().enumerate() {
            let height = 200.0 * value / max;
            let x = left + i as f64 * width;
            writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{height:.1}\" fill=\"{}\"/>\n<text x=\"{x:.1}\" y=\"{:.1}\">{value:.1}</text>\n<text x=\"{x:.1}\" y=\"270\" font-size=\"10\">{label}</text>",
                240.0 - height,
                width * 0.8,
                if label.starts_with("tcpguard") { "#2b7bb9" } else { "#c0504d" },
                235.0 - height,
            )
            .unwrap();
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn short(defence: Defence) -> &'static str {
    match defence {
        Defence::Kernel => "kernel",
        Defence::Tcpguard => "tcpguard",
    }
}
