//! `cargo xtask bench xdp`: what each path of tcpguard's XDP program costs, run by the kernel
//! (BPF_PROG_TEST_RUN) against a program that only returns XDP_PASS, run the same way in the
//! same run. Prints ns per packet and the ratio to that baseline. A path that leaves the frame
//! as it was is repeated in the kernel and timed to a hundredth of a ns (see [`Baseline::time`]),
//! beside the kernel's own figure, which it truncates to whole ns; a path that rewrites the frame
//! is timed one call at a time, by the kernel. The rig's two SYN-ACK floors
//! (`tcpguard-ebpf/src/bin/xdp_synack_floor.rs`: a SYN-ACK with no cookie, with and without
//! the kernel's socket lookup) are timed beside the SYN paths, and the floors of the paths that
//! pass a segment on (`tcpguard-ebpf/src/bin/xdp_pass_floor.rs`) beside those.

use std::{
    collections::BTreeSet,
    net::{TcpListener, TcpStream},
    process::Command,
    time::Instant,
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use tcpguard::Guard;
use tcpguard_common::{Counter, PortTable, cookie::CookieSecrets};
use tcpguard_tests::{frame::*, netns::in_fresh_netns, xdp};

const PORT: u16 = 8080;
/// Runs of the short and the long call that time a repeated path; see [`Baseline::time`].
const REPEAT_SHORT: u32 = 20_000;
const REPEAT_LONG: u32 = 2_020_000;
/// Rounds of the two calls per repeated path, the path and the baseline in alternation.
const ROUNDS: usize = 7;
/// Calls for paths that rewrite the frame: with repeat > 1 the kernel does not restore the
/// frame between runs, so each is timed with repeat = 1 and the results averaged.
const SINGLE_CALLS: u32 = 20_000;

fn main() {
    in_fresh_netns(|| {
        let lo = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        assert!(lo.is_ok_and(|s| s.success()), "bringing loopback up");
        let listener = TcpListener::bind(("0.0.0.0", PORT)).expect("listener");
        let mut guard = xdp::load(&[PORT]);
        let mut own = xdp::load_for(&[PORT], true);
        let mut baseline_object = xdp::load_pass();
        let baseline: &mut Xdp = baseline_object
            .program_mut("xdp_pass")
            .unwrap()
            .try_into()
            .unwrap();

        // An established connection to the server's own address (on loopback), for the
        // "established" path: loopback addresses are martian, and pass untouched.
        let client = TcpStream::connect((SERVER_V4, PORT)).expect("connect");
        let (_server_side, _) = listener.accept().expect("accept");
        let mut established = TcpFrame::syn_v4(PORT).with_flags(ACK);
        established.ip = Ip::V4 {
            source: SERVER_V4,
            destination: SERVER_V4,
            options: Vec::new(),
        };
        established.source_port = client.local_addr().unwrap().port();
        established.payload = vec![0x42; 64];

        let syn = TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1460, 1, 7));
        let mut baseline = Baseline::new(baseline, syn.bytes());
        println!("tcpguard XDP path costs, BPF_PROG_TEST_RUN on this machine");
        let verified = |guard: &Guard| {
            guard
                .program()
                .info()
                .ok()
                .and_then(|info| info.verified_instruction_count())
                .map_or("?".to_owned(), |count| count.to_string())
        };
        println!(
            "verifier: {} instructions processed for the kernel's-cookies XDP program, {} for the own-cookies one",
            verified(&guard),
            verified(&own)
        );
        let count = |count: Option<u32>| count.map_or("?".to_owned(), |count| count.to_string());
        let reqsk = tcpguard::reqsk::Reqsk::load(None).ok();
        println!(
            "verifier: {} instructions processed for the TC egress program, {} for the TC ingress (reqsk) one",
            count(guard.egress_verified_instructions()),
            count(
                reqsk
                    .as_ref()
                    .and_then(|reqsk| reqsk.verified_instructions())
            ),
        );
        println!(
            "baseline XDP_PASS: {:.1} ns/packet one call at a time (repeat 1, mean of {SINGLE_CALLS}); \
             repeated, timed beside each repeated path (below the table)",
            baseline.single
        );
        println!(
            "repeated paths: thread CPU time of a {REPEAT_LONG}-run call less a {REPEAT_SHORT}-run \
             one (least of {ROUNDS} each) over the runs between; \
             kernel's figure: the least BPF_PROG_TEST_RUN duration of the long calls, whole ns"
        );
        println!("| path | verdict | ns/packet | × baseline | kernel's figure |");
        println!("| --- | --- | --- | --- | --- |");
        own.set_cookie_secrets(&CookieSecrets {
            keys: [[1, 2], [3, 4]],
            generation: 1,
            previous_until_s: 0,
        })
        .expect("writing cookie keys");
        for (mode, guard) in [("kernel's cookies", &guard), ("own cookies", &own)] {
            cookie_rows(guard, &syn, mode, &mut baseline, 20_000);
        }
        drop(own);
        floor_rows(&syn, &baseline);

        let valid_ack = cookie_ack(&guard, &syn, syn.source_port);
        // Track valid_ack's flow, for the tracked-flow row.
        let (first, _) = xdp::run_counted(&guard, &valid_ack.bytes());
        assert_eq!(first.action, xdp::XDP_PASS);
        let paths: [(&str, Vec<u8>, Counter); 5] = [
            (
                "established, kernel socket lookup (untracked)",
                established.bytes(),
                Counter::KnownSocket,
            ),
            (
                "established, tracked flow",
                valid_ack.bytes(),
                Counter::TrackedFlow,
            ),
            (
                "unprotected",
                TcpFrame::syn_v4(PORT + 1).bytes(),
                Counter::Unprotected,
            ),
            (
                "unprotected IPv6",
                TcpFrame::syn_v6(PORT + 1).bytes(),
                Counter::Unprotected,
            ),
            (
                "invalid (NULL flags)",
                TcpFrame::syn_v4(PORT).with_flags(0).bytes(),
                Counter::NullFlags,
            ),
        ];
        for (name, frame, counter) in paths {
            row(&guard, name, &frame, counter, &mut baseline);
        }
        pass_floor_rows(&valid_ack, &mut baseline);
        let beside = &baseline.beside;
        let ns = beside.iter().map(|timing| timing.ns);
        let kernel = beside.iter().map(|timing| timing.kernel_ns);
        println!(
            "\nbaseline XDP_PASS repeated, timed beside the {} repeated paths: {:.2}–{:.2} ns/packet \
             (kernel's figure {}–{} ns)",
            beside.len(),
            ns.clone().fold(f64::INFINITY, f64::min),
            ns.fold(0.0, f64::max),
            kernel.clone().min().unwrap_or(0),
            kernel.max().unwrap_or(0),
        );
        port_change(&mut guard);
    });
}

/// What a change of protected ports (a reload's) costs the daemon: one write of the whole
/// port table, timed by the wall clock, median of 21.
fn port_change(guard: &mut Guard) {
    let sets = [BTreeSet::from([PORT, PORT + 2]), BTreeSet::from([PORT])];
    let mut micros: Vec<f64> = (0..21)
        .map(|round| {
            let start = Instant::now();
            guard
                .set_ports(&sets[round % 2])
                .expect("writing the ports");
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    micros.sort_by(f64::total_cmp);
    println!(
        "daemon: a change of protected ports, one write of the {} KiB port table: {:.0} µs (median of {})",
        size_of::<PortTable>() / 1024,
        micros[micros.len() / 2],
        micros.len()
    );
}

/// The XDP_PASS program every path is compared with.
struct Baseline<'a> {
    program: &'a Xdp,
    frame: Vec<u8>,
    /// ns of one call with repeat 1, mean of SINGLE_CALLS.
    single: f64,
    /// Its repeated timings, one for each repeated path it was timed beside.
    beside: Vec<Timing>,
}

/// What one run of a repeated path costs.
#[derive(Clone, Copy)]
struct Timing {
    ns: f64,
    /// BPF_PROG_TEST_RUN's own figure: whole ns, truncated.
    kernel_ns: u32,
}

impl<'a> Baseline<'a> {
    fn new(program: &'a Xdp, frame: Vec<u8>) -> Self {
        let single = single(program, &frame);
        Self {
            program,
            frame,
            single,
            beside: Vec::new(),
        }
    }

    /// `frame` through `program`, repeated, and its ratio to the baseline timed in alternation
    /// with it, so that a drift of the machine during the run (±1.5 ns from one run to the
    /// next) falls on both alike.
    ///
    /// The kernel's figure is its time over the run count, truncated to whole ns: a fifth of
    /// the baseline's 5–6 ns. So each path is run in a short and a long call, and timed by the
    /// thread's CPU time: the long call's less the short one's, over the runs between, counts
    /// only the runs, not the call around them. Not wall time: a repeated call's wall time
    /// comes in steps of a kernel tick (at least 16 ms on the development VM, for any repeat
    /// count up to about a million), while its CPU time grows with the repeat count. Each
    /// call's least time over ROUNDS rounds is the one least disturbed by the rest of the
    /// machine.
    fn time(&mut self, program: &Xdp, frame: &[u8]) -> (Timing, f64) {
        let mut path = Calls::default();
        let mut baseline = Calls::default();
        for _ in 0..ROUNDS {
            path.add(program, frame);
            baseline.add(self.program, &self.frame);
        }
        let (path, baseline) = (path.timing(), baseline.timing());
        self.beside.push(baseline);
        (path, path.ns / baseline.ns)
    }
}

/// The least CPU time and kernel figure of a path's short and long calls so far.
struct Calls {
    short_ns: f64,
    long_ns: f64,
    kernel_ns: u32,
}

impl Default for Calls {
    fn default() -> Self {
        Self {
            short_ns: f64::INFINITY,
            long_ns: f64::INFINITY,
            kernel_ns: u32::MAX,
        }
    }
}

impl Calls {
    fn add(&mut self, program: &Xdp, frame: &[u8]) {
        let (short_ns, _) = call(program, frame, REPEAT_SHORT);
        let (long_ns, kernel_ns) = call(program, frame, REPEAT_LONG);
        self.short_ns = self.short_ns.min(short_ns);
        self.long_ns = self.long_ns.min(long_ns);
        self.kernel_ns = self.kernel_ns.min(kernel_ns);
    }

    fn timing(&self) -> Timing {
        Timing {
            ns: (self.long_ns - self.short_ns) / f64::from(REPEAT_LONG - REPEAT_SHORT),
            kernel_ns: self.kernel_ns,
        }
    }
}

/// One BPF_PROG_TEST_RUN call of `repeat` runs: the thread's CPU time it took, and the
/// kernel's figure per run.
fn call(program: &Xdp, frame: &[u8], repeat: u32) -> (f64, u32) {
    let start = thread_cpu_ns();
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    let cpu_ns = thread_cpu_ns() - start;
    let kernel_ns = u32::try_from(result.duration.as_nanos()).unwrap_or(u32::MAX);
    (cpu_ns, kernel_ns)
}

/// The calling thread's CPU time, in ns.
fn thread_cpu_ns() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(result, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    now.tv_sec as f64 * 1e9 + now.tv_nsec as f64
}

/// The rows of the cookie paths in the configured mode: SYN → SYN-ACK, a valid cookie ACK on a
/// fresh 4-tuple (it starts tracking, so each is timed once), and a bad one. Source ports from
/// `base_port` on keep the modes' 4-tuples apart.
fn cookie_rows(guard: &Guard, syn: &TcpFrame, mode: &str, baseline: &mut Baseline, base_port: u16) {
    let syn_cost = single(guard.program(), &syn.bytes());
    let (check, _) = xdp::run_counted(guard, &syn.bytes());
    assert_eq!(check.action, xdp::XDP_TX, "the SYN is answered");
    println!(
        "| {mode}: SYN → SYN-ACK (repeat 1) | {} | {syn_cost:.1} | {:.2} | {syn_cost:.1} |",
        Counter::SynCookieSent.name(),
        syn_cost / baseline.single
    );
    let ack_for = |port: u16| cookie_ack(guard, syn, port);
    let fresh: Vec<Vec<u8>> = (0..SINGLE_CALLS as u16)
        .map(|n| ack_for(base_port + n).bytes())
        .collect();
    let before = guard.counters().expect("reading counters");
    let cookie_cost = fresh
        .iter()
        .map(|frame| once(guard.program(), frame))
        .sum::<f64>()
        / fresh.len() as f64;
    let moved = guard.counters().expect("reading counters").since(&before);
    assert_eq!(
        moved.get(Counter::CookieAccepted),
        fresh.len() as u64,
        "{mode}: every fresh ACK took the cookie path: {:?}",
        moved.nonzero().collect::<Vec<_>>()
    );
    println!(
        "| {mode}: valid cookie ACK (repeat 1, fresh 4-tuples) | {} | {cookie_cost:.1} | {:.2} | {cookie_cost:.1} |",
        Counter::CookieAccepted.name(),
        cookie_cost / baseline.single
    );
    let mut bad = ack_for(base_port + SINGLE_CALLS as u16);
    bad.ack ^= 0x0055_5500;
    row(
        guard,
        &format!("{mode}: bad cookie ACK"),
        &bad.bytes(),
        Counter::CookieRejected,
        baseline,
    );
}

/// The floors' SYN → SYN-ACK: what answering a SYN costs with no cookie, with no lookup and with
/// the kernel's socket lookup alone, timed as the SYN paths are.
fn floor_rows(syn: &TcpFrame, baseline: &Baseline) {
    for (name, program) in [
        ("floor: SYN → SYN-ACK, no cookie", "xdp_synack_floor"),
        (
            "floor with socket lookup: SYN → SYN-ACK, no cookie",
            "xdp_synack_floor_lookup",
        ),
    ] {
        let mut object = xdp::load_floor(program);
        let program = xdp::floor(&mut object, program);
        let answered = program
            .test_run(TestRunOptions {
                data_in: Some(&syn.bytes()),
                data_out: Some(&mut [0u8; 256]),
                repeat: 1,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(
            answered.return_value,
            xdp::XDP_TX,
            "{name}: the SYN is answered"
        );
        let cost = single(program, &syn.bytes());
        println!(
            "| {name} (repeat 1) | - | {cost:.1} | {:.2} | {cost:.1} |",
            cost / baseline.single
        );
    }
}

/// The floors of the paths that pass a segment on, timed as those paths are: a fixed-offset
/// dissection with the port lookup (for an unprotected segment) and with one flow-map lookup
/// (for a tracked one). tcpguard's own dissection also takes VLAN tags, IPv4 options and IPv6
/// extension headers and checks lengths, which these do not.
fn pass_floor_rows(tracked: &TcpFrame, baseline: &mut Baseline) {
    let mut object = xdp::load_pass_floor();
    xdp::track_in_pass_floor(&mut object, &tracked.flow_key());
    for (name, program, frame) in [
        (
            "floor: untagged IPv4 parse, port lookup",
            "xdp_pass_unprotected",
            TcpFrame::syn_v4(PORT + 1).bytes(),
        ),
        (
            "floor: untagged IPv4 parse, flow-map lookup",
            "xdp_pass_tracked",
            tracked.bytes(),
        ),
    ] {
        let program = xdp::floor(&mut object, program);
        let outcome = xdp::run_program(program, &frame);
        assert_eq!(outcome.action, xdp::XDP_PASS, "{name}: passed");
        let (cost, ratio) = baseline.time(program, &frame);
        println!(
            "| {name} | - | {:.2} | {ratio:.2} | {} |",
            cost.ns, cost.kernel_ns
        );
    }
}

/// The client's ACK completing the handshake `syn` (from source port `port`) opens: the
/// SYN-ACK's cookie acknowledged, its timestamp echoed.
fn cookie_ack(guard: &Guard, syn: &TcpFrame, port: u16) -> TcpFrame {
    let mut syn = syn.clone();
    syn.source_port = port;
    let answer = xdp::run(guard, &syn.bytes());
    let cookie = u32::from_be_bytes(answer.frame[38..42].try_into().unwrap());
    let mut ack = syn.clone().with_flags(ACK);
    ack.seq = syn.seq.wrapping_add(1);
    ack.ack = cookie.wrapping_add(1);
    // The SYN-ACK carries MSS, SACK-permitted, then timestamps: TSval at byte 62 of the frame.
    let tsval: [u8; 4] = answer.frame[62..66].try_into().unwrap();
    ack.options = [1, 1, 8, 10, 0, 0, 0, 1].into_iter().chain(tsval).collect();
    ack
}

/// One repeated path: checks the counter it moves, then times it.
fn row(guard: &Guard, name: &str, frame: &[u8], counter: Counter, baseline: &mut Baseline) {
    let (outcome, moved) = xdp::run_counted(guard, frame);
    assert_eq!(
        moved.nonzero().map(|(c, _)| c).collect::<Vec<_>>(),
        vec![counter],
        "{name} takes the {counter:?} path (action {})",
        outcome.action
    );
    let (cost, ratio) = baseline.time(guard.program(), frame);
    println!(
        "| {name} | {} | {:.2} | {ratio:.2} | {} |",
        counter.name(),
        cost.ns,
        cost.kernel_ns
    );
}

/// Mean ns per run over SINGLE_CALLS calls with repeat = 1.
fn single(program: &Xdp, frame: &[u8]) -> f64 {
    let total: f64 = (0..SINGLE_CALLS).map(|_| once(program, frame)).sum();
    total / f64::from(SINGLE_CALLS)
}

/// ns of one run, with repeat = 1.
fn once(program: &Xdp, frame: &[u8]) -> f64 {
    let mut out = vec![0u8; 256];
    program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN")
        .duration
        .as_nanos() as f64
}
