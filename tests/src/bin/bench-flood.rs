//! What a SYN flood costs the protected host, and what it does to real clients, with the
//! kernel's own defence (`tcp_syncookies = 2`, no XDP), with tcpguard on each of its cookie
//! paths (own cookies, for every SYN and with `cookies = "under-attack"`, whose difference is
//! what detecting the attack costs; the kernel's through the listener-mode helpers), and with the rig's
//! floor (an XDP program that turns each SYN into a SYN-ACK with no cookie and no lookup: what
//! any XDP answer pays here), and with the floor plus the kernel's socket lookup (a SYN is
//! answered only for a listener: what any correct answer pays), measured side by side in one
//! run over the same veth rig, in several rounds. The floors answer clients with SYN-ACKs no
//! socket stands behind, so they are measured for cost only.
//!
//! Cost. Generator: `tcpguard_tests::generator`, BPF_PROG_TEST_RUN in live-frames mode, on one
//! core of the client namespace; hping3 (one thread, about 80k SYN/s here) does not load the
//! server enough to compare the two defences at their limit. The server's veth runs its NAPI
//! poll in a kernel thread of its own (threaded NAPI), pinned to the other core. Everything the
//! protected host does with a SYN happens in that thread: the XDP program, or the kernel's
//! whole receive path with its cookie, and the SYN-ACK's transmission up to the veth. The
//! client's end has a threaded NAPI poll of its own, so receiving SYN-ACKs is not charged to
//! the server. The cost per SYN is that thread's CPU time (its `schedstat`), plus the tcpguard
//! daemon's, divided by the SYNs answered.
//!
//! Clients: connect() from the client namespace every 20 ms, timed: idle, during an hping3
//! flood (a rate both defences absorb), and during the generator's flood (where the veth's
//! queue, full, drops SYNs of flood and clients alike before either defence sees them).

use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{Ebpf, maps::PerCpuArray, programs::XdpMode};
use tcpguard_tests::{
    generator::Sent,
    netns::Namespace,
    observe,
    rig::{
        CLIENT, CLIENT_IF, Daemon, Flood, Rig, SERVER, SERVER_IF, SYN_FLOOD_SOURCES,
        kernel_counters,
    },
    xdp,
};

const PORT: u16 = 8080;
const FLOOD: Duration = Duration::from_secs(10);
const FLOOD_PACKETS: u64 = 50_000_000;
const IDLE: Duration = Duration::from_secs(3);
const HPING_SECONDS: u32 = 10;
const HPING_PACKETS: u32 = 5_000_000;
const ROUNDS: usize = 3;
/// The core the server's NAPI thread runs on; the generator and the client's NAPI thread share
/// the other.
const SERVER_CPU: usize = 1;
const CLIENT_CPU: usize = 0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Defence {
    Kernel,
    TcpguardOwn,
    /// Own cookies with `cookies = "under-attack"`: what detecting the attack costs.
    TcpguardUnderAttack,
    TcpguardKernelCookies,
    Floor,
    /// The floor with the kernel's socket lookup that any correct answer makes.
    FloorLookup,
}

impl Defence {
    const COUNT: usize = 6;
    const ALL: [Self; Self::COUNT] = [
        Self::Kernel,
        Self::TcpguardOwn,
        Self::TcpguardUnderAttack,
        Self::TcpguardKernelCookies,
        Self::Floor,
        Self::FloorLookup,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel SYN cookies (tcp_syncookies=2)",
            Self::TcpguardOwn => "tcpguard, own cookies",
            Self::TcpguardUnderAttack => "tcpguard, own cookies under attack",
            Self::TcpguardKernelCookies => "tcpguard, kernel's cookies",
            Self::Floor => "floor (SYN-ACK, no cookie)",
            Self::FloorLookup => "floor with socket lookup (SYN-ACK for a listener, no cookie)",
        }
    }

    /// A floor program, measured for cost only: its SYN-ACKs have no socket behind them.
    fn is_floor(self) -> bool {
        matches!(self, Self::Floor | Self::FloorLookup)
    }

    /// The program of a floor.
    fn floor_program(self) -> Option<&'static str> {
        match self {
            Self::Floor => Some("xdp_synack_floor"),
            Self::FloorLookup => Some("xdp_synack_floor_lookup"),
            _ => None,
        }
    }

    /// `--cookies` of the daemon, for tcpguard.
    fn cookies(self) -> &'static str {
        if self == Self::TcpguardUnderAttack {
            "under-attack"
        } else {
            "always"
        }
    }

    /// `--cookie-mode` of the daemon, for tcpguard.
    fn cookie_mode(self) -> Option<&'static str> {
        match self {
            Self::TcpguardOwn | Self::TcpguardUnderAttack => Some("own"),
            Self::TcpguardKernelCookies => Some("kernel"),
            Self::Kernel | Self::Floor | Self::FloorLookup => None,
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

    fn extend(&mut self, other: &Self) {
        self.latencies.extend_from_slice(&other.latencies);
        self.failures += other.failures;
    }

    fn success(&self) -> f64 {
        let total = self.latencies.len() + self.failures;
        100.0 * self.latencies.len() as f64 / total.max(1) as f64
    }
}

struct Run {
    defence: Defence,
    idle: Clients,
    /// During the hping3 flood.
    hping: Clients,
    /// During the generator's flood.
    flood: Clients,
    sent: Sent,
    /// SYNs the server's veth received (the rest the client's veth dropped, its peer's queue
    /// being full).
    received: u64,
    answered: u64,
    /// CPU time of the server's NAPI thread during the flood.
    napi_seconds: f64,
    /// CPU time of the tcpguard daemon during the flood (0 for the kernel alone).
    daemon_seconds: f64,
}

impl Run {
    fn cost_ns(&self) -> f64 {
        (self.napi_seconds + self.daemon_seconds) * 1e9 / self.answered.max(1) as f64
    }

    fn napi_busy(&self) -> f64 {
        100.0 * self.napi_seconds / self.sent.seconds
    }
}

fn main() {
    let rounds: Vec<[Run; Defence::COUNT]> = (1..=ROUNDS)
        .map(|round| {
            eprintln!("== round {round} of {ROUNDS}");
            Defence::ALL.map(run)
        })
        .collect();
    let mut report = String::new();
    writeln!(
        report,
        "SYN flood over veth, {} s per defence and round from an XDP generator (BPF_PROG_TEST_RUN live frames, one core; random sources in {}/{}, Linux SYN options). CPU is the server's NAPI thread, pinned to a core of its own, plus the daemon's:\n",
        FLOOD.as_secs(),
        SYN_FLOOD_SOURCES.0,
        SYN_FLOOD_SOURCES.1
    )
    .unwrap();
    writeln!(
        report,
        "| round | defence | SYNs offered/s | SYNs received | SYNs answered | server NAPI thread busy | daemon CPU | CPU per SYN answered | × kernel | × floor | × floor with lookup |"
    )
    .unwrap();
    writeln!(
        report,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    .unwrap();
    // Per defence: its cost against the kernel's and against each floor, round by round.
    let mut ratios: [[Vec<f64>; 3]; Defence::COUNT] = Default::default();
    for (round, runs) in rounds.iter().enumerate() {
        let [kernel, .., floor, floor_lookup] = runs;
        for (index, run) in runs.iter().enumerate() {
            let [to_kernel, to_floor, to_floor_lookup] =
                [kernel, floor, floor_lookup].map(|base| run.cost_ns() / base.cost_ns());
            for (ratios, ratio) in
                ratios[index]
                    .iter_mut()
                    .zip([to_kernel, to_floor, to_floor_lookup])
            {
                ratios.push(ratio);
            }
            writeln!(
                report,
                "| {} | {} | {:.0} k | {} | {} | {:.0}% | {:.0} ms | {:.0} ns | {to_kernel:.2} | {to_floor:.2} | {to_floor_lookup:.2} |",
                round + 1,
                run.defence.name(),
                run.sent.rate() / 1000.0,
                run.received,
                run.answered,
                run.napi_busy(),
                run.daemon_seconds * 1000.0,
                run.cost_ns(),
            )
            .unwrap();
        }
    }
    writeln!(report).unwrap();
    for (defence, [to_kernel, to_floor, to_floor_lookup]) in Defence::ALL.iter().zip(&mut ratios) {
        if *defence == Defence::Kernel || defence.is_floor() {
            continue;
        }
        let [k, f, l] = [to_kernel, to_floor, to_floor_lookup].map(|r| median_and_range(r));
        writeln!(
            report,
            "{}: CPU per SYN {:.2}× the kernel's ({:.2}–{:.2}), {:.2}× the floor ({:.2}–{:.2}) and {:.2}× the floor with socket lookup ({:.2}–{:.2}), median and range over {ROUNDS} rounds.",
            defence.name(),
            k.0,
            k.1,
            k.2,
            f.0,
            f.1,
            f.2,
            l.0,
            l.1,
            l.2
        )
        .unwrap();
    }
    writeln!(
        report,
        "\nClients (connect() every 20 ms from the client namespace, all rounds together):\n\n| defence | phase | connects | success | p50 | p99 |\n| --- | --- | --- | --- | --- | --- |"
    )
    .unwrap();
    let totals = Defence::ALL.map(|defence| Totals::of(defence, &rounds));
    for totals in totals.iter().filter(|t| !t.defence.is_floor()) {
        for (phase, clients) in totals.phases() {
            writeln!(
                report,
                "| {} | {phase} | {} | {:.1}% | {:.2} ms | {:.2} ms |",
                totals.defence.name(),
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
        std::fs::write(&path, plot(&totals)).expect("writing the plot");
        eprintln!("plot written to {path}");
    }
}

/// One defence over every round.
struct Totals {
    defence: Defence,
    idle: Clients,
    hping: Clients,
    flood: Clients,
    cpu_seconds: f64,
    answered: u64,
}

impl Totals {
    fn of(defence: Defence, rounds: &[[Run; Defence::COUNT]]) -> Self {
        let mut totals = Self {
            defence,
            idle: Clients::default(),
            hping: Clients::default(),
            flood: Clients::default(),
            cpu_seconds: 0.0,
            answered: 0,
        };
        for run in rounds.iter().flatten().filter(|run| run.defence == defence) {
            totals.idle.extend(&run.idle);
            totals.hping.extend(&run.hping);
            totals.flood.extend(&run.flood);
            totals.cpu_seconds += run.napi_seconds + run.daemon_seconds;
            totals.answered += run.answered;
        }
        totals
    }

    fn cost_ns(&self) -> f64 {
        self.cpu_seconds * 1e9 / self.answered.max(1) as f64
    }

    fn phases(&self) -> [(&'static str, &Clients); 3] {
        [
            ("idle", &self.idle),
            ("hping3 flood", &self.hping),
            ("generator flood", &self.flood),
        ]
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
    // The kernel's cookies need these; own cookies leave the host's defaults alone.
    if defence.cookie_mode() != Some("own") {
        rig.server.sysctl("net.ipv4.tcp_syncookies", "2");
        rig.server.sysctl("net.ipv4.tcp_timestamps", "2");
    }
    let listener = rig
        .server
        .within(|| TcpListener::bind(("0.0.0.0", PORT)).unwrap());
    std::thread::spawn(move || for _ in listener.incoming() {});
    let daemon = defence.cookie_mode().map(|mode| {
        Daemon::start(
            &rig.server,
            &[
                "--iface",
                SERVER_IF,
                "--port",
                "8080",
                "--stats-interval",
                "0",
                "--cookie-mode",
                mode,
                "--cookies",
                defence.cookies(),
            ],
        )
    });
    let floor = defence
        .floor_program()
        .map(|program| rig.server.within(|| attach_floor(program)));
    let flood = rig.syn_flood(PORT);

    let measured = !defence.is_floor();
    let idle = if measured {
        measure_clients(&rig.client, IDLE)
    } else {
        Clients::default()
    };
    let hping = if !measured {
        Clients::default()
    } else {
        let flood = Flood::start(
            &rig.client,
            &["-S", "--rand-source"],
            PORT,
            HPING_SECONDS,
            HPING_PACKETS,
        );
        let clients = measure_clients(&rig.client, Duration::from_secs(HPING_SECONDS.into()));
        flood.wait();
        clients
    };
    // Threaded NAPI only now: woken threads answer in bursts, which costs the clients of the
    // hping3 phase retransmissions that softirq polling does not.
    let server_napi = threaded_napi(&rig.server, SERVER_IF);
    let client_napi = threaded_napi(&rig.client, CLIENT_IF);
    pin(server_napi, SERVER_CPU);
    pin(client_napi, CLIENT_CPU);
    let answered_before = answered(&rig.server, daemon.as_ref(), floor.as_ref());
    let received_before = interface_counter(&rig.server, SERVER_IF, "rx_packets");
    let napi_before = cpu_seconds(server_napi);
    let daemon_before = daemon.as_ref().map_or(0.0, |d| cpu_seconds(d.pid()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = {
        let stop = stop.clone();
        rig.client.spawn(move || {
            let mut clients = Clients::default();
            while measured && !stop.load(Ordering::Relaxed) {
                connect_once(&mut clients);
            }
            clients
        })
    };
    let sent = rig
        .client
        .within(move || {
            pin(0, CLIENT_CPU);
            flood.run(FLOOD, FLOOD_PACKETS)
        })
        .expect("running the SYN generator");
    let napi_seconds = cpu_seconds(server_napi) - napi_before;
    let daemon_seconds = daemon.as_ref().map_or(0.0, |d| cpu_seconds(d.pid())) - daemon_before;
    let received = interface_counter(&rig.server, SERVER_IF, "rx_packets") - received_before;
    let answered = answered(&rig.server, daemon.as_ref(), floor.as_ref()) - answered_before;
    stop.store(true, Ordering::Relaxed);
    let flood_clients = clients.join().unwrap();
    if let Some(daemon) = daemon {
        daemon.stop();
    }
    Run {
        defence,
        idle,
        hping,
        flood: flood_clients,
        sent,
        received,
        answered,
        napi_seconds,
        daemon_seconds,
    }
}

/// SYN-ACKs the server has sent so far: by tcpguard's count when it runs, by the floor's when
/// it does, else by the kernel's.
fn answered(server: &Namespace, daemon: Option<&Daemon>, floor: Option<&Ebpf>) -> u64 {
    if let Some(daemon) = daemon {
        return observe::status(&daemon.paths)["packets"]["syn_cookie_sent"]
            .as_u64()
            .expect("tcpguard's status counts syn_cookie_sent");
    }
    if let Some(floor) = floor {
        let counts: PerCpuArray<_, u64> =
            PerCpuArray::try_from(floor.map("ANSWERED").expect("the floor's ANSWERED map"))
                .expect("a per-CPU array");
        return counts.get(&0, 0).expect("reading ANSWERED").iter().sum();
    }
    kernel_counters(server)["TcpExtSyncookiesSent"]
}

/// A floor program attached to the server's veth in native mode, in the calling thread's
/// namespace; detached when the returned object is dropped.
fn attach_floor(name: &str) -> Ebpf {
    let mut ebpf = xdp::load_floor(name);
    let interface = std::ffi::CString::new(SERVER_IF).unwrap();
    xdp::floor(&mut ebpf, name)
        .attach(interface.as_c_str(), XdpMode::Driver)
        .expect("attaching the floor to the server's veth");
    ebpf
}

/// Median, lowest and highest of `values`.
fn median_and_range(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    (
        values[values.len() / 2],
        values[0],
        values[values.len() - 1],
    )
}

/// Turns on threaded NAPI for `interface` and returns the pid of its one NAPI thread.
fn threaded_napi(namespace: &Namespace, interface: &str) -> u32 {
    let prefix = format!("napi/{interface}-");
    let find = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.starts_with(&prefix))
            })
            .collect()
    };
    // A previous run's namespace (with an interface of the same name) may still be going
    // away, its NAPI thread with it, for longer than a run lasts: this interface's thread is
    // the one that was not there before.
    let before = find();
    // `ip netns exec` mounts the namespace's own /sys for the command it runs.
    namespace.run(
        "sh",
        &[
            "-c",
            &format!("echo 1 > /sys/class/net/{interface}/threaded"),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let new: Vec<u32> = find()
            .into_iter()
            .filter(|pid| !before.contains(pid))
            .collect();
        if new.len() == 1 || Instant::now() >= deadline {
            assert_eq!(
                new.len(),
                1,
                "expected one new NAPI thread named {prefix}*, found {new:?} (and {before:?} from before)"
            );
            return new[0];
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Restricts `pid` (0: the calling thread) to `cpu`.
fn pin(pid: u32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let status = libc::sched_setaffinity(pid as i32, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            status,
            0,
            "cannot pin {pid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// CPU time of every thread of `pid`, from schedstat (nanoseconds on the CPU).
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|err| panic!("cannot list the threads of {pid}: {err}"))
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum::<u64>() as f64
        / 1e9
}

fn interface_counter(namespace: &Namespace, interface: &str, name: &str) -> u64 {
    let output = namespace.run(
        "cat",
        &[&format!("/sys/class/net/{interface}/statistics/{name}")],
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
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

/// Two bar charts as SVG: CPU per SYN answered, and client p99 connect latency.
fn plot(totals: &[Totals]) -> String {
    let mut svg = String::from(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"720\" height=\"300\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"720\" height=\"300\" fill=\"white\"/>\n",
    );
    let charts: [(&str, Vec<(String, f64)>); 2] = [
        (
            "CPU per SYN answered (ns), all rounds",
            totals
                .iter()
                .map(|totals| (totals.defence.name().to_owned(), totals.cost_ns()))
                .collect(),
        ),
        (
            "client connect p99 (ms): idle, hping3 flood",
            totals
                .iter()
                .filter(|totals| !totals.defence.is_floor())
                .flat_map(|totals| {
                    [
                        (
                            format!("{} idle", short(totals.defence)),
                            totals.idle.quantile(0.99),
                        ),
                        (
                            format!("{} flood", short(totals.defence)),
                            totals.hping.quantile(0.99),
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
        Defence::TcpguardOwn => "tcpguard own",
        Defence::TcpguardUnderAttack => "tcpguard under attack",
        Defence::TcpguardKernelCookies => "tcpguard kernel",
        Defence::Floor => "floor",
        Defence::FloorLookup => "floor with lookup",
    }
}
