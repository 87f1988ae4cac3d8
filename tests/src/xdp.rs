//! Running tcpguard's XDP program on a frame with BPF_PROG_TEST_RUN.

use std::{collections::BTreeSet, process::Command};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use tcpguard::{Counters, Guard};
use tcpguard_common::{Flow, FlowKey, FlowKeyV4};

use crate::{
    frame::{SERVER_MAC, SERVER_V4, SERVER_V6},
    netns,
};

/// What the program did with one frame.
#[derive(Debug)]
pub struct Outcome {
    /// XDP_DROP = 1, XDP_PASS = 2, XDP_TX = 3.
    pub action: u32,
    /// The frame after the program ran.
    pub frame: Vec<u8>,
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// tcpguard loaded with `ports` protected and this namespace's SYN-cookie settings, in a
/// namespace that owns the server's addresses ([`SERVER_V4`], [`SERVER_V6`], on loopback) and
/// whose protected interface has [`SERVER_MAC`], as the frames of [`crate::frame`] expect.
pub fn load(ports: &[u16]) -> Guard {
    load_for(ports, false)
}

/// As [`load`], with the XDP program of the cookie mode `own_cookies` names.
pub fn load_for(ports: &[u16], own_cookies: bool) -> Guard {
    own_server_addresses();
    let ports: BTreeSet<u16> = ports.iter().copied().collect();
    let config = tcpguard::sysctl::syn_cookie_config().expect("reading sysctls");
    let mut guard =
        Guard::load(&ports, config, own_cookies).expect("loading tcpguard's XDP program");
    guard
        .set_interface_mac(SERVER_MAC)
        .expect("writing the interface's MAC");
    let owned = tcpguard::host::addresses().expect("listing this namespace's addresses");
    guard
        .set_host_addresses(&owned)
        .expect("writing the host's addresses");
    guard
}

/// Gives the calling thread's network namespace the server's addresses, on loopback, as a host
/// carries a service address.
pub fn own_server_addresses() {
    netns::run("ip", &["link", "set", "lo", "up"]);
    for (family, address) in [
        ("-4", format!("{SERVER_V4}/32")),
        ("-6", format!("{SERVER_V6}/128")),
    ] {
        let added = Command::new("ip")
            .args([family, "addr", "replace", &address, "dev", "lo"])
            .args(if family == "-6" { &["nodad"][..] } else { &[] })
            .status()
            .expect("running ip");
        assert!(added.success(), "adding {address} to lo");
    }
}

/// The XDP_PASS program, loaded: the benchmarks' baseline, and what the rig attaches to the
/// client's veth end. Keep the returned object alive as long as the program is needed.
pub fn load_pass() -> aya::Ebpf {
    let mut ebpf = aya::Ebpf::load(tcpguard::ebpf::XDP_PASS_OBJECT).expect("xdp-pass object");
    let program: &mut aya::programs::Xdp = ebpf
        .program_mut("xdp_pass")
        .expect("xdp_pass program")
        .try_into()
        .expect("an XDP program");
    program.load().expect("loading xdp_pass");
    ebpf
}

/// The floor program `name` of the rig (`xdp_synack_floor` or `xdp_synack_floor_lookup`, see
/// `tcpguard-ebpf/src/bin/xdp_synack_floor.rs`), loaded. Keep the returned object alive as long
/// as the program is needed.
pub fn load_floor(name: &str) -> aya::Ebpf {
    let mut ebpf =
        aya::Ebpf::load(tcpguard::ebpf::XDP_SYNACK_FLOOR_OBJECT).expect("the floor object");
    floor(&mut ebpf, name).load().expect("loading a floor");
    ebpf
}

/// The floors of the pass paths (`tcpguard-ebpf/src/bin/xdp_pass_floor.rs`), loaded.
pub fn load_pass_floor() -> aya::Ebpf {
    let mut ebpf =
        aya::Ebpf::load(tcpguard::ebpf::XDP_PASS_FLOOR_OBJECT).expect("the pass floor object");
    for name in ["xdp_pass_unprotected", "xdp_pass_tracked"] {
        floor(&mut ebpf, name).load().expect("loading a floor");
    }
    ebpf
}

/// Puts the IPv4 flow `key` in the flow map of an object [`load_pass_floor`] returned, for
/// `xdp_pass_tracked` to find.
pub fn track_in_pass_floor(ebpf: &mut aya::Ebpf, key: &FlowKey) {
    let mut flows: aya::maps::HashMap<_, FlowKeyV4, Flow> = ebpf
        .map_mut("FLOWS_V4")
        .expect("the floor's flow map")
        .try_into()
        .expect("a hash map");
    flows
        .insert(&key.v4(), &Flow::default(), 0)
        .expect("a flow");
}

/// The floor program `name` in an object [`load_floor`] or [`load_pass_floor`] returned.
pub fn floor<'a>(ebpf: &'a mut aya::Ebpf, name: &str) -> &'a mut aya::programs::Xdp {
    ebpf.program_mut(name)
        .unwrap_or_else(|| panic!("the floor object has no {name}"))
        .try_into()
        .expect("an XDP program")
}

/// Runs the program once on `frame`, in the calling thread's network namespace.
pub fn run(guard: &Guard, frame: &[u8]) -> Outcome {
    run_program(guard.program(), frame)
}

/// Runs `program` once on `frame`, in the calling thread's network namespace.
pub fn run_program(program: &Xdp, frame: &[u8]) -> Outcome {
    let mut out = vec![0u8; 4096];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    Outcome {
        action: result.return_value,
        frame: out,
    }
}

/// Runs `frame` and returns the outcome with the counters that moved.
pub fn run_counted(guard: &Guard, frame: &[u8]) -> (Outcome, Counters) {
    let before = guard.counters().expect("reading counters");
    let outcome = run(guard, frame);
    let after = guard.counters().expect("reading counters");
    (outcome, after.since(&before))
}
