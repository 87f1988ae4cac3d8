//! Rare events, logged through aya-log with their connection's 4-tuple: the first occurrence,
//! then at most one line a second per CPU and kind, with the number held back since
//! ([`LogLimit`]). Only failure branches call these; the packet paths that work log nothing.
//!
//! Each kind of line is a BPF global function (`#[unsafe(no_mangle)]` gives it global BTF
//! linkage): the verifier checks it once, on its own, and a call costs its caller a call
//! instruction however many paths lead there, where aya-log-ebpf's macros inlined into the
//! packet paths would be verified again on each of them and add their stack to the SYN path's.
//! The frame of its own is also what keeps the macros' stack stores aligned: built with
//! `+allows-misaligned-mem-access` (see `tcpguard/build.rs`), LLVM is free to store a record
//! field's two-byte length at an odd stack offset, which the verifier refuses ("misaligned stack
//! access"); with arguments of fixed size (a `[u8; 4]` or `[u8; 16]` address, integers) and
//! nothing else in the function, the fields never reach the stack. A `core::net::IpAddr`
//! argument, whose length varies, does reach it, at an odd offset: keep to fixed sizes. The
//! functions' frames add to their callers' (at most 512 bytes together): the own-cookie
//! program's deepest caller has 392, and these have 80.
//!
//! The verifier needs a pointer argument of a global function to be null-checked, hence the
//! raw `*const FlowKey`; Linux 5.12 and later accept such arguments.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::PerCpuArray};
use aya_log_ebpf::{error, info, warn};
use tcpguard_common::{FLOW_IPV4, FlowKey, LogLimit, rare_event};

#[map(name = "RARE_LIMITS")]
static RARE_LIMITS: PerCpuArray<LogLimit> =
    PerCpuArray::with_max_entries(rare_event::RUST_KINDS, 0);

/// Whether an event of `kind` at `now_ns` is logged, and if so how many were held back since
/// this CPU's last line about it.
#[inline(always)]
fn limit(kind: u8, now_ns: u64) -> Option<u64> {
    let limit = RARE_LIMITS.get_ptr_mut(u32::from(kind))?;
    // SAFETY: a per-CPU slot, written only by this CPU.
    unsafe { &mut *limit }.occur(now_ns)
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// The client's and the server's IPv4 address of `key`.
#[inline(always)]
fn v4(key: &FlowKey) -> ([u8; 4], [u8; 4]) {
    let v4 = |address: &[u8; 16]| *address.first_chunk::<4>().unwrap_or(&[0; 4]);
    (v4(&key.client_addr), v4(&key.server_addr))
}

/// Logs a line about `key` at `$level` (aya-log-ebpf's `error` or `warn`): `$v4` for IPv4,
/// `$v6` for IPv6, each with the 4-tuple's four placeholders after the arguments `$before`
/// and before `$after`.
macro_rules! flow_line {
    ($level:ident, $key:expr, $v4:literal, $v6:literal, ($($before:expr),*), ($($after:expr),*)) => {{
        let key: &FlowKey = $key;
        if key.family == FLOW_IPV4 {
            let (client, server) = v4(key);
            $level!(
                &(), $v4, $($before,)* client, key.client_port, server, key.server_port, $($after),*
            );
        } else {
            $level!(
                &(), $v6, $($before,)* key.client_addr, key.client_port, key.server_addr,
                key.server_port, $($after),*
            );
        }
    }};
}

/// The lifecycle ring had no room at `now_ns`: the daemon's connection table misses an event
/// of `key`. While the ring stays full this runs for every event, so it takes the time the
/// event already read rather than reading the clock again.
#[inline(always)]
pub fn event_ring_full(key: &FlowKey, now_ns: u64) {
    // SAFETY: `key` is a reference, so a valid FlowKey.
    unsafe { tcpguard_log_event_ring_full(key, now_ns) };
}

/// # Safety
///
/// `key` is null or points at a `FlowKey` (the verifier checks that the program passes one).
#[unsafe(no_mangle)]
#[inline(never)]
unsafe extern "C" fn tcpguard_log_event_ring_full(key: *const FlowKey, now_ns: u64) -> i32 {
    // SAFETY: the caller's promise (the verifier also checks it for the program's calls).
    let Some(key) = (unsafe { key.as_ref() }) else {
        return 0;
    };
    let Some(held_back) = limit(rare_event::EVENT_RING_FULL, now_ns) else {
        return 0;
    };
    flow_line!(
        warn,
        key,
        "lifecycle event ring full: an event of {:i}:{} -> {:i}:{} is lost ({} more on this CPU since the last line)",
        "lifecycle event ring full: an event of [{:i}]:{} -> [{:i}]:{} is lost ({} more on this CPU since the last line)",
        (),
        (held_back)
    );
    0
}

/// The flow map refused `key` (`error`, from the map update): the connection goes on,
/// untracked.
#[inline(always)]
pub fn flow_insert_failed(key: &FlowKey, error: i64) {
    // SAFETY: `key` is a reference, so a valid FlowKey.
    unsafe { tcpguard_log_flow_insert(key, error) };
}

/// # Safety
///
/// `key` is null or points at a `FlowKey` (the verifier checks that the program passes one).
#[unsafe(no_mangle)]
#[inline(never)]
unsafe extern "C" fn tcpguard_log_flow_insert(key: *const FlowKey, error: i64) -> i32 {
    // SAFETY: the caller's promise.
    let Some(key) = (unsafe { key.as_ref() }) else {
        return 0;
    };
    let Some(held_back) = limit(rare_event::FLOW_INSERT, now_ns()) else {
        return 0;
    };
    flow_line!(
        error,
        key,
        "flow map insert failed with error {}: {:i}:{} -> {:i}:{} is not tracked ({} more on this CPU since the last line)",
        "flow map insert failed with error {}: [{:i}]:{} -> [{:i}]:{} is not tracked ({} more on this CPU since the last line)",
        (error),
        (held_back)
    );
    0
}

/// `bpf_tcp_gen_syncookie` refused the SYN (`error`): it goes to the kernel unanswered.
#[inline(always)]
pub fn syn_cookie_failed(key: &FlowKey, error: i64) {
    // SAFETY: `key` is a reference, so a valid FlowKey.
    unsafe { tcpguard_log_syn_cookie(key, error) };
}

/// # Safety
///
/// `key` is null or points at a `FlowKey` (the verifier checks that the program passes one).
#[unsafe(no_mangle)]
#[inline(never)]
unsafe extern "C" fn tcpguard_log_syn_cookie(key: *const FlowKey, error: i64) -> i32 {
    // SAFETY: the caller's promise.
    let Some(key) = (unsafe { key.as_ref() }) else {
        return 0;
    };
    let Some(held_back) = limit(rare_event::SYN_COOKIE, now_ns()) else {
        return 0;
    };
    flow_line!(
        error,
        key,
        "bpf_tcp_gen_syncookie failed with error {}: the SYN {:i}:{} -> {:i}:{} goes to the kernel unanswered ({} more on this CPU since the last line)",
        "bpf_tcp_gen_syncookie failed with error {}: the SYN [{:i}]:{} -> [{:i}]:{} goes to the kernel unanswered ({} more on this CPU since the last line)",
        (error),
        (held_back)
    );
    0
}

/// The SYN-ACK could not be built in the frame: the SYN is dropped.
#[inline(always)]
pub fn syn_ack_failed(key: &FlowKey) {
    // SAFETY: `key` is a reference, so a valid FlowKey.
    unsafe { tcpguard_log_syn_ack(key) };
}

/// # Safety
///
/// `key` is null or points at a `FlowKey` (the verifier checks that the program passes one).
#[unsafe(no_mangle)]
#[inline(never)]
unsafe extern "C" fn tcpguard_log_syn_ack(key: *const FlowKey) -> i32 {
    // SAFETY: the caller's promise.
    let Some(key) = (unsafe { key.as_ref() }) else {
        return 0;
    };
    let Some(held_back) = limit(rare_event::SYN_ACK, now_ns()) else {
        return 0;
    };
    flow_line!(
        error,
        key,
        "SYN-ACK could not be built in the frame: the SYN {:i}:{} -> {:i}:{} is dropped ({} more on this CPU since the last line)",
        "SYN-ACK could not be built in the frame: the SYN [{:i}]:{} -> [{:i}]:{} is dropped ({} more on this CPU since the last line)",
        (),
        (held_back)
    );
    0
}

/// No metadata room for the record of an accepted own-cookie ACK (`error`, from
/// `bpf_xdp_adjust_meta`): the ACK is dropped and the client retries.
#[inline(always)]
pub fn handover_failed(key: &FlowKey, error: i64) {
    // SAFETY: `key` is a reference, so a valid FlowKey.
    unsafe { tcpguard_log_handover(key, error) };
}

/// # Safety
///
/// `key` is null or points at a `FlowKey` (the verifier checks that the program passes one).
#[unsafe(no_mangle)]
#[inline(never)]
unsafe extern "C" fn tcpguard_log_handover(key: *const FlowKey, error: i64) -> i32 {
    // SAFETY: the caller's promise.
    let Some(key) = (unsafe { key.as_ref() }) else {
        return 0;
    };
    let Some(held_back) = limit(rare_event::HANDOVER, now_ns()) else {
        return 0;
    };
    flow_line!(
        error,
        key,
        "bpf_xdp_adjust_meta failed with error {}: the own-cookie ACK {:i}:{} -> {:i}:{} cannot reach the TC ingress program and is dropped ({} more on this CPU since the last line)",
        "bpf_xdp_adjust_meta failed with error {}: the own-cookie ACK [{:i}]:{} -> [{:i}]:{} cannot reach the TC ingress program and is dropped ({} more on this CPU since the last line)",
        (error),
        (held_back)
    );
    0
}

/// The SYN counting moved the attack state on (see `attack::syn_seen`): an attack started at
/// `rate` SYN/s (`threshold` and more is one), or ended with the last window at `rate`
/// (`threshold` being the end rate, below which windows count as calm). Not limited: the
/// hysteresis keeps the changes seconds apart, though two CPUs that roll the same window may
/// both log its change (see `tcpguard_common::attack`).
#[inline(always)]
pub fn attack_changed(started: bool, rate: u64, threshold: u64) {
    tcpguard_log_attack(u32::from(started), rate, threshold);
}

#[unsafe(no_mangle)]
#[inline(never)]
extern "C" fn tcpguard_log_attack(started: u32, rate: u64, threshold: u64) -> i32 {
    if started != 0 {
        info!(
            &(),
            "XDP: attack started at {} SYN/s to protected ports (from {} SYN/s on is an attack)",
            rate,
            threshold
        );
    } else {
        info!(
            &(),
            "XDP: attack over, {} SYN/s to protected ports in the last window (below {} SYN/s long enough)",
            rate,
            threshold
        );
    }
    0
}
