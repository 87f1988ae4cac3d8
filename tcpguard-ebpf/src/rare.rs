//! Rare events, recorded for the daemon's log with their connection's 4-tuple: the first
//! occurrence, then at most one record a second per CPU and kind with the number held back
//! since ([`LogLimit`]). Only failure branches call these; the packet paths that work record
//! nothing.
//!
//! Not aya-log-ebpf: its macros build every field of a line on the stack first. With this
//! crate's `+allows-misaligned-mem-access` LLVM merges some of those byte stores into two-byte
//! stores at odd stack offsets, which the verifier refuses ("misaligned stack access"); written
//! without the macros, through aya-log's field types, the line took the SYN path past the
//! 512-byte stack. A fixed record written straight into ring memory needs no stack, and is
//! what the C program writes too.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use tcpguard_common::{
    FlowKey, LogLimit, RARE_ERROR, RARE_EVENT_RING_BYTES, RARE_WARN, RareEvent, rare_event,
};

#[map(name = "RARE_EVENTS")]
static RARE_EVENTS: RingBuf = RingBuf::with_byte_size(RARE_EVENT_RING_BYTES, 0);

#[map(name = "RARE_LIMITS")]
static RARE_LIMITS: PerCpuArray<LogLimit> =
    PerCpuArray::with_max_entries(rare_event::RUST_KINDS, 0);

/// Records an event of `kind` about `key` at `now_ns` unless one went out from this CPU less
/// than a second before.
#[inline(always)]
fn record(kind: u8, level: u8, key: &FlowKey, error: i64, now_ns: u64) {
    let Some(limit) = RARE_LIMITS.get_ptr_mut(u32::from(kind)) else {
        return;
    };
    // SAFETY: a per-CPU slot, written only by this CPU.
    let limit = unsafe { &mut *limit };
    let Some(held_back) = limit.occur(now_ns) else {
        return;
    };
    let Some(mut entry) = RARE_EVENTS.reserve::<RareEvent>(0) else {
        // The daemon is behind: this one is told with the next record.
        limit.held_back += held_back + 1;
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned record of the right size; written
    // field by field, as nothing is built on the stack (see the module's comment).
    unsafe {
        (*event).key = *key;
        (*event).error = error as i32;
        (*event).kind = kind;
        (*event).level = level;
        (*event)._pad = [0; 2];
        (*event).held_back = held_back;
    }
    entry.submit(0);
}

/// The lifecycle ring had no room at `now_ns`: the daemon's connection table misses an event
/// of `key`. While the ring stays full this runs for every event, so it takes the time the
/// event already read rather than reading the clock again.
#[inline(always)]
pub fn event_ring_full(key: &FlowKey, now_ns: u64) {
    record(rare_event::EVENT_RING_FULL, RARE_WARN, key, 0, now_ns);
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// The flow map refused `key` (`error`, from the map update): the connection goes on,
/// untracked.
#[inline(always)]
pub fn flow_insert_failed(key: &FlowKey, error: i64) {
    record(rare_event::FLOW_INSERT, RARE_ERROR, key, error, now_ns());
}

/// `bpf_tcp_gen_syncookie` refused the SYN (`error`): it goes to the kernel unanswered.
#[inline(always)]
pub fn syn_cookie_failed(key: &FlowKey, error: i64) {
    record(rare_event::SYN_COOKIE, RARE_ERROR, key, error, now_ns());
}

/// The SYN-ACK could not be built in the frame: the SYN is dropped.
#[inline(always)]
pub fn syn_ack_failed(key: &FlowKey) {
    record(rare_event::SYN_ACK, RARE_ERROR, key, 0, now_ns());
}

/// No metadata room for the record of an accepted own-cookie ACK (`error`, from
/// `bpf_xdp_adjust_meta`): the ACK is dropped and the client retries.
#[inline(always)]
pub fn handover_failed(key: &FlowKey, error: i64) {
    record(rare_event::HANDOVER, RARE_ERROR, key, error, now_ns());
}
