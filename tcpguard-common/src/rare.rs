//! Rare events of the data plane that are worth a line in the daemon's log: a helper or kfunc
//! that fails, a SYN-ACK that cannot be built, a full ring buffer. Each is recorded the first
//! time it happens, then at most once per [`RARE_LOG_INTERVAL_NS`] per CPU and kind, with the
//! number of occurrences held back since: a flood of them never becomes a flood of lines.
//!
//! The Rust programs log these lines through aya-log (`tcpguard-ebpf/src/rare.rs`), after
//! [`LogLimit`] says so. The C program (`tcpguard-ebpf/c/reqsk.c`), for which aya-log has no C
//! side, writes [`RareEvent`] records to a ring of its own, `RARE_EVENTS`
//! ([`crate::maps::RARE_EVENTS`]); the daemon turns each into a line of its log at the level
//! the program chose.

use crate::FlowKey;

/// The shortest time between two lines about the same kind of event from the same CPU.
pub const RARE_LOG_INTERVAL_NS: u64 = 1_000_000_000;

/// Where a CPU keeps the limit of one kind of event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogLimit {
    /// `bpf_ktime_get_ns` of the last line, 0 before the first.
    pub last_ns: u64,
    /// Occurrences since that line that were not logged.
    pub held_back: u64,
}

impl LogLimit {
    /// Counts an occurrence at `now_ns`. When it is to be logged, returns how many occurrences
    /// since the last line were not.
    #[inline(always)]
    pub fn occur(&mut self, now_ns: u64) -> Option<u64> {
        if self.last_ns != 0 && now_ns.wrapping_sub(self.last_ns) < RARE_LOG_INTERVAL_NS {
            self.held_back += 1;
            return None;
        }
        let held_back = self.held_back;
        self.last_ns = now_ns;
        self.held_back = 0;
        Some(held_back)
    }
}

/// Kinds of rare events. The Rust programs' kinds index their `RARE_LIMITS` map; the C
/// program's (from [`REQSK_NO_LISTENER`]), which are [`RareEvent::kind`]s, index its own, less
/// [`REQSK_NO_LISTENER`].
pub mod rare_event {
    /// The lifecycle ring had no room for an event.
    pub const EVENT_RING_FULL: u8 = 0;
    /// The flow map refused a new flow.
    pub const FLOW_INSERT: u8 = 1;
    /// `bpf_tcp_gen_syncookie` refused a SYN.
    pub const SYN_COOKIE: u8 = 2;
    /// A SYN-ACK could not be built in the frame.
    pub const SYN_ACK: u8 = 3;
    /// `bpf_xdp_adjust_meta` gave no room for the record of an accepted own-cookie ACK.
    pub const HANDOVER: u8 = 4;
    /// Kinds of the Rust programs.
    pub const RUST_KINDS: u32 = 5;
    /// TC ingress (C): no listener for an accepted own-cookie ACK's 4-tuple any more.
    pub const REQSK_NO_LISTENER: u8 = 5;
    /// TC ingress (C): `bpf_sk_assign_tcp_reqsk` refused the ACK.
    pub const REQSK_REFUSED: u8 = 6;
}

/// [`RareEvent::level`]: as the `log` crate numbers its levels.
pub const RARE_ERROR: u8 = 1;
/// [`RareEvent::level`].
pub const RARE_WARN: u8 = 2;

/// Bytes of the C program's rare-event ring: hundreds of records, far more than one second of
/// lines from every CPU.
pub const RARE_EVENT_RING_BYTES: u32 = 1 << 15;

/// One rare event, as the C program writes it to its `RARE_EVENTS` ring (`struct
/// tcpguard_rare_event` in `reqsk.c`, same layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RareEvent {
    /// The connection concerned.
    pub key: FlowKey,
    /// The helper's or kfunc's (negative) error, where the event is one; 0 otherwise.
    pub error: i32,
    /// One of [`rare_event`].
    pub kind: u8,
    /// [`RARE_ERROR`] or [`RARE_WARN`]: the program's judgment of the event.
    pub level: u8,
    pub _pad: [u8; 2],
    /// Occurrences of this kind on this CPU since the last record that were held back.
    pub held_back: u64,
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], made of integers and byte arrays, padding spelled out as fields.
unsafe impl aya::Pod for RareEvent {}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = RARE_LOG_INTERVAL_NS;

    #[test]
    fn the_first_occurrence_is_logged_then_one_a_second_with_the_count_since() {
        let mut limit = LogLimit::default();
        let start = 5 * SECOND;
        assert_eq!(limit.occur(start), Some(0));
        for offset in 1..=999 {
            assert_eq!(limit.occur(start + offset * 1_000_000), None);
        }
        assert_eq!(limit.occur(start + SECOND), Some(999));
        assert_eq!(limit.occur(start + SECOND + 1), None);
        // A quiet spell: the next occurrence is logged at once, with the one held back.
        assert_eq!(limit.occur(start + 60 * SECOND), Some(1));
        assert_eq!(limit.occur(start + 60 * SECOND), None);
    }

    #[test]
    fn a_flood_gets_one_line_per_interval() {
        let mut limit = LogLimit::default();
        let (mut lines, mut counted) = (0, 0);
        // 10 s of one occurrence every 100 µs.
        for step in 1..=100_000u64 {
            if let Some(held_back) = limit.occur(step * 100_000) {
                lines += 1;
                counted += 1 + held_back;
            }
        }
        assert_eq!(lines, 10);
        assert_eq!(counted + limit.held_back, 100_000);
    }

    #[test]
    fn the_record_has_no_hidden_padding() {
        assert_eq!(size_of::<RareEvent>(), 56);
    }
}
