//! Tracked connections: the flow map, refreshed by every segment, and the lifecycle events that
//! report the segments able to change a connection's state. Plain data produces no event.

use core::{borrow::Borrow, mem::MaybeUninit};

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
pub use tcpguard_common::Direction;
use tcpguard_common::{
    DEFAULT_FLOW_CAPACITY, EVENT_RING_BYTES, EVENTS_LOST, EVENTS_SENT, EventKind, FLOW_IPV4,
    FLOW_IPV6, Flow, FlowKey, FlowKeyV4, LifecycleEvent, SYN_TIMES_CAPACITY, SegmentHeader,
    SynTime,
};

use crate::{
    clock,
    frame::{Frame, read},
    parse::{Family, Segment},
    rare, zero,
};

// One map per family: see FlowKeyV4.
#[map(name = "FLOWS_V4")]
static FLOWS_V4: LruHashMap<FlowKeyV4, Flow> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

#[map(name = "FLOWS_V6")]
static FLOWS_V6: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

/// A plain array rather than a hash map: the SYN path, which a flood drives, pays one store.
#[map(name = "SYN_TIMES")]
static SYN_TIMES: Array<SynTime> = Array::with_max_entries(SYN_TIMES_CAPACITY, 0);

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENT_RING_BYTES, 0);

/// Where [`key`] builds a flow key: slot 0 for XDP, slot 1 for TC. Kept off the stack, which
/// the SYN path already nearly fills.
#[map(name = "KEY_SCRATCH")]
static KEY_SCRATCH: PerCpuArray<FlowKey> = PerCpuArray::with_max_entries(2, 0);

#[map(name = "EVENT_STATS")]
static EVENT_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// The segment's connection as a [`FlowKey`], oriented client → server.
#[inline(always)]
pub fn key<'a>(ctx: &impl Frame, segment: &Segment, direction: Direction) -> Option<&'a FlowKey> {
    let slot = match direction {
        Direction::FromClient => 0,
        Direction::FromServer => 1,
    };
    let key = KEY_SCRATCH.get_ptr_mut(slot)?;
    let (source, destination, family) = match segment.family {
        Family::V4 => (
            address_words(read::<4>(ctx, segment.l3 + 12)?),
            address_words(read::<4>(ctx, segment.l3 + 16)?),
            FLOW_IPV4,
        ),
        Family::V6 => (
            address_words(read::<16>(ctx, segment.l3 + 8)?),
            address_words(read::<16>(ctx, segment.l3 + 24)?),
            FLOW_IPV6,
        ),
    };
    let (client, server, client_port, server_port) = match direction {
        Direction::FromClient => (source, destination, segment.sport, segment.dport),
        Direction::FromServer => (destination, source, segment.dport, segment.sport),
    };
    let (client_port, server_port) = (client_port.to_ne_bytes(), server_port.to_ne_bytes());
    let last = u64::from_ne_bytes([
        client_port[0],
        client_port[1],
        server_port[0],
        server_port[1],
        family,
        0,
        0,
        0,
    ]);
    // Written as the five words FlowKey is made of, in place: byte stores, or a struct built on
    // the stack and copied, cost several times as many instructions per packet.
    let words = key.cast::<u64>();
    // SAFETY: a per-CPU slot, used only within this invocation, and each direction has its own;
    // FlowKey is five 8-byte-aligned words (see tcpguard-common).
    unsafe {
        for (index, word) in [client[0], client[1], server[0], server[1], last]
            .into_iter()
            .enumerate()
        {
            words.add(index).write_volatile(word);
        }
        Some(&*key)
    }
}

/// An address as the two words of a [`FlowKey`] address field: IPv4 in the first four bytes,
/// the rest zero.
#[inline(always)]
fn address_words<const N: usize>(address: [u8; N]) -> [u64; 2] {
    let mut bytes = [0u8; 16];
    bytes[..N].copy_from_slice(&address);
    let (first, second) = bytes.split_at(8);
    [
        u64::from_ne_bytes(first.try_into().unwrap_or_default()),
        u64::from_ne_bytes(second.try_into().unwrap_or_default()),
    ]
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// The clock a program times its SYN answers on (see [`syn_answered`]), read when the
/// handshake's ACK arrives.
pub enum SynClock {
    /// `bpf_ktime_get_ns`, which [`start`] reads anyway: the kernel-cookie program's clock.
    Monotonic,
    /// TAI nanoseconds, as the own-cookie program reads for its cookie.
    Tai(u64),
}

/// The fields of `segment` the reporting decision ([`tcpguard_common::report`]) reads.
#[inline(always)]
fn header(segment: &Segment) -> SegmentHeader {
    SegmentHeader {
        flags: segment.flags,
        seq: segment.seq,
        ack: segment.ack,
        payload_len: segment.payload_len(),
    }
}

/// Whether the kernel is known to have built a connection's socket when tracking starts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum KernelSocket {
    /// The kernel has it, or builds it from any later segment if it drops the one starting
    /// the flow (its own handshake, its own cookies).
    Certain,
    /// Built from one of tcpguard's own cookies: the kernel may still drop the ACK that
    /// returned it (see [`tcpguard_common::Flow::awaiting_socket`]).
    Awaited,
}

/// Starts tracking a connection whose opening segment (`segment`, from the client) was just
/// passed to the kernel, and reports it as `kind`.
#[inline(always)]
pub fn start(
    key: &FlowKey,
    segment: &Segment,
    kind: EventKind,
    clock: SynClock,
    socket: KernelSocket,
) {
    let now = now_ns();
    let opened = Flow::opened_by(&header(segment), now);
    let mut flow = MaybeUninit::uninit();
    // Built in place, field by field, to keep it off the SYN path's crowded stack.
    // SAFETY: Flow is plain old data; all-zero is a valid value.
    let flow: &mut Flow = unsafe { zero::zeroed_in(&mut flow) };
    flow.last_seen_ns = opened.last_seen_ns;
    flow.client_control_seq = opened.client_control_seq;
    flow.client_ack = opened.client_ack;
    flow.server_ack = opened.server_ack;
    flow.unacked = opened.unacked;
    flow.awaiting_socket = u8::from(socket == KernelSocket::Awaited);
    // A full LRU map evicts its least recently used entry, so this only fails on allocation.
    let inserted = if key.family == FLOW_IPV4 {
        FLOWS_V4.insert(KeyV4::of(key), flow, 0)
    } else {
        FLOWS_V6.insert(key, flow, 0)
    };
    if let Err(error) = inserted {
        rare::flow_insert_failed(key, error.into());
    }
    let clock_ns = match clock {
        SynClock::Monotonic => now,
        SynClock::Tai(tai_ns) => tai_ns,
    };
    let syn_time_ns = take_syn_time(key, now, clock_ns);
    report(
        key,
        segment,
        Direction::FromClient,
        kind,
        now,
        syn_time_ns,
        segment.seq,
    );
}

/// Remembers that a SYN was answered (with a cookie, or by the kernel outside an attack) at
/// `clock_ns` (the program's [`SynClock`]), for the handshake time, and
/// forgets an earlier connection on the same 4-tuple: the kernel had only the listener for it,
/// so that connection is gone (its TIME-WAIT over), and its flow entry would otherwise pass the
/// new handshake's ACK to the kernel as a tracked segment, without the cookie record the
/// own-cookie path needs.
#[inline(always)]
pub fn syn_answered(key: &FlowKey, clock_ns: u64) {
    forget(key);
    let (index, tag) = syn_slot(key);
    if let Some(slot) = SYN_TIMES.get_ptr_mut(index) {
        // SAFETY: a slot of a shared array, written whole; a racing writer can only make the
        // handshake time unknown (tag mismatch).
        unsafe { *slot = SynTime::new(tag, clock_ns) };
    }
}

/// Forgets the flow `key`, if there is one.
#[inline(always)]
fn forget(key: &FlowKey) {
    // Looked up first: a flood's SYNs have no flow, and a lookup takes no lock where a delete
    // takes the bucket's.
    if lookup(key).is_none() {
        return;
    }
    let _ = if key.family == FLOW_IPV4 {
        FLOWS_V4.remove(KeyV4::of(key))
    } else {
        FLOWS_V6.remove(key)
    };
}

/// The flow `key`, in its family's map.
#[inline(always)]
fn lookup(key: &FlowKey) -> Option<*mut Flow> {
    if key.family == FLOW_IPV4 {
        FLOWS_V4.get_ptr_mut(KeyV4::of(key))
    } else {
        FLOWS_V6.get_ptr_mut(key)
    }
}

/// An IPv4 flow map key on the stack: [`FlowKey::v4_words`], 8-aligned as the verifier wants
/// an 8-byte stack access.
struct KeyV4([u64; 2]);

impl KeyV4 {
    #[inline(always)]
    fn of(key: &FlowKey) -> Self {
        Self(key.v4_words())
    }
}

impl Borrow<FlowKeyV4> for KeyV4 {
    #[inline(always)]
    fn borrow(&self) -> &FlowKeyV4 {
        // SAFETY: the words are a FlowKeyV4's 12 bytes and 4 more, 8-aligned (see v4_words).
        unsafe { &*self.0.as_ptr().cast::<FlowKeyV4>() }
    }
}

/// When `key`'s SYN was answered, on the monotonic clock that reads `now_ns`, if its slot still
/// holds it; the slot is emptied. `clock_ns` is the program's SYN clock read at about `now_ns`.
#[inline(always)]
fn take_syn_time(key: &FlowKey, now_ns: u64, clock_ns: u64) -> u64 {
    let (index, tag) = syn_slot(key);
    let Some(slot) = SYN_TIMES.get_ptr_mut(index) else {
        return 0;
    };
    // SAFETY: as in syn_answered.
    unsafe {
        let held = *slot;
        if held.tag() != tag {
            return 0;
        }
        *slot = SynTime::default();
        now_ns.wrapping_sub(clock_ns.wrapping_sub(held.time_before(clock_ns)))
    }
}

#[inline(always)]
fn syn_slot(key: &FlowKey) -> (u32, u16) {
    let hash = key.hash();
    // The high bits are the mixed ones: the index from bits 32 up, the tag from the top 16.
    (
        (hash >> 32) as u32 & (SYN_TIMES_CAPACITY - 1),
        (hash >> 48) as u16 | 1,
    )
}

/// How many ticks must pass before a flow's `last_seen_ns` is written again: 100 ms at
/// Debian's 250 Hz, 25 ms at 1,000 Hz, 250 ms at 100 Hz. Idle timeouts count in seconds.
const LAST_SEEN_STEP_TICKS: u32 = 25;

/// The flow of `segment`, looked up without building its whole [`FlowKey`] where it is IPv4:
/// every tracked segment takes this path, and only an event needs the whole key.
#[inline(always)]
fn lookup_segment(ctx: &impl Frame, segment: &Segment, direction: Direction) -> Option<*mut Flow> {
    match segment.family {
        Family::V4 => {
            let addresses = read::<8>(ctx, segment.l3 + 12)?;
            let words =
                FlowKeyV4::words_of_segment(addresses, segment.sport, segment.dport, direction);
            FLOWS_V4.get_ptr_mut(KeyV4(words))
        }
        Family::V6 => FLOWS_V6.get_ptr_mut(key(ctx, segment, direction)?),
    }
}

/// The tracked flow of `segment`, refreshed by it, with an event when the state machine needs
/// the segment ([`Flow::observe`] decides). `None` when the flow is not tracked.
#[inline(always)]
pub fn track(ctx: &impl Frame, segment: &Segment, direction: Direction) -> Option<()> {
    let flow = lookup_segment(ctx, segment, direction)?;
    // SAFETY: the value stays valid while this program runs; concurrent writers on other CPUs
    // can only make the idle time or a FIN record slightly stale, never unsafe.
    refresh(unsafe { &mut *flow }, segment, direction, || {
        key(ctx, segment, direction)
    });
    Some(())
}

/// As [`track`], for a segment from the client whose whole key the caller built already: the
/// SYN and cookie-ACK paths, which need it anyway.
#[inline(always)]
pub fn track_key(key: &FlowKey, segment: &Segment) -> Option<()> {
    let flow = lookup(key)?;
    // SAFETY: as in track.
    refresh(
        unsafe { &mut *flow },
        segment,
        Direction::FromClient,
        || Some(key),
    );
    Some(())
}

/// As [`track`], for a segment from the client that the kernel can take only on a socket it
/// has: a flow still awaiting its socket ([`KernelSocket::Awaited`]) is tracked once `socket_built`
/// says the kernel has it, and is `None` until then, so that the segment is judged as an
/// untracked one (and returns the cookie again).
#[inline(always)]
pub fn track_built(
    ctx: &impl Frame,
    segment: &Segment,
    socket_built: impl FnOnce() -> bool,
) -> Option<()> {
    let flow = lookup_segment(ctx, segment, Direction::FromClient)?;
    // SAFETY: as in track.
    let flow = unsafe { &mut *flow };
    if flow.awaiting_socket != 0 {
        if !socket_built() {
            return None;
        }
        flow.awaiting_socket = 0;
    }
    refresh(flow, segment, Direction::FromClient, || {
        key(ctx, segment, Direction::FromClient)
    });
    Some(())
}

/// `key` gives the flow's whole key, for an event.
#[inline(always)]
fn refresh<'a>(
    flow: &mut Flow,
    segment: &Segment,
    direction: Direction,
    key: impl FnOnce() -> Option<&'a FlowKey>,
) {
    // The idle time needs no better than the coarse clock (the last tick's time, no clock
    // source read), and is written only once LAST_SEEN_STEP_TICKS passed: a busy flow's
    // segments, on both CPUs of its two directions, do not all write its cache line.
    let tick = clock::jiffies() as u32;
    if tick.wrapping_sub(flow.seen_tick) >= LAST_SEEN_STEP_TICKS {
        flow.seen_tick = tick;
        flow.last_seen_ns = clock::coarse().coarse_ns;
    }
    if let Some(receiver_ack) = flow.observe(direction, &header(segment))
        && let Some(key) = key()
    {
        report(
            key,
            segment,
            direction,
            EventKind::Segment,
            now_ns(),
            0,
            receiver_ack,
        );
    }
}

#[inline(always)]
fn report(
    key: &FlowKey,
    segment: &Segment,
    direction: Direction,
    kind: EventKind,
    time_ns: u64,
    syn_time_ns: u64,
    receiver_ack: u32,
) {
    let Some(mut entry) = EVENTS.reserve::<LifecycleEvent>(0) else {
        bump(EVENTS_LOST);
        rare::event_ring_full(key, time_ns);
        return;
    };
    // Written field by field into the ring: a whole record built on the stack would not fit
    // beside the SYN path's.
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned record of the right size.
    unsafe {
        (*event).key = *key;
        (*event).time_ns = time_ns;
        (*event).syn_time_ns = syn_time_ns;
        (*event).seq = segment.seq;
        (*event).ack = segment.ack;
        (*event).receiver_ack = receiver_ack;
        (*event).payload_len = segment.payload_len();
        (*event).flags = segment.flags;
        (*event).kind = kind as u8;
        (*event).direction = direction as u8;
        zero::clear(&mut (*event)._pad);
    }
    entry.submit(0);
    bump(EVENTS_SENT);
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(value) = EVENT_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe { *value += 1 };
    }
}
