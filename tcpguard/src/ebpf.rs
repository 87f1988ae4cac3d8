//! The eBPF objects built by build.rs. Those only tests and benchmarks use are there with the
//! `testing` feature, which tcpguard-tests enables.

/// tcpguard's XDP program (`tcpguard-ebpf/src/main.rs`).
pub static TCPGUARD_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpguard"));

/// A program that returns XDP_PASS: the benchmarks' baseline, and what test rigs attach to the
/// far end of a veth pair so that XDP_TX frames reach it.
#[cfg(feature = "testing")]
pub static XDP_PASS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-pass"));

/// The benchmarks' SYN generator (`tcpguard-ebpf/src/bin/xdp_syn_flood.rs`), run with
/// BPF_PROG_TEST_RUN in live-frames mode.
#[cfg(feature = "testing")]
pub static XDP_SYN_FLOOD_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-syn-flood"));

/// The TC ingress classifier that turns an ACK carrying the XDP program's cookie record into a
/// connection through the kfunc `bpf_sk_assign_tcp_reqsk` (`tcpguard-ebpf/c/reqsk.c`).
pub static REQSK_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reqsk.o"));

/// Test only (`tcpguard-ebpf/src/bin/xdp_cookie_ack.rs`): puts a given cookie record in front
/// of bare IPv4 ACKs as XDP metadata, standing in for tcpguard's XDP program.
#[cfg(feature = "testing")]
pub static XDP_COOKIE_ACK_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-cookie-ack"));

/// Benchmark only (`tcpguard-ebpf/src/bin/xdp_synack_floor.rs`): answers every SYN with a
/// SYN-ACK without a cookie, after a socket lookup or without one: the floors `bench flood`
/// measures the defences against.
#[cfg(feature = "testing")]
pub static XDP_SYNACK_FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-synack-floor"));

/// Benchmark only (`tcpguard-ebpf/src/bin/xdp_pass_floor.rs`): the floors of the paths that
/// pass a segment on, a parse with a read of the port table and a parse with one flow-map lookup.
#[cfg(feature = "testing")]
pub static XDP_PASS_FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-pass-floor"));
