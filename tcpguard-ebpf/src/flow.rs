//! Tracked connections: the flow map, refreshed by every segment, and the lifecycle events that
//! report the segments able to change a connection's state. Plain data produces no event.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use tcpguard_common::{
    CLIENT_FIN, CLIENT_FIN_ACKED, DEFAULT_FLOW_CAPACITY, EVENT_RING_BYTES, EVENT_SEGMENT,
    EVENTS_LOST, EVENTS_SENT, FLOW_IPV4, FLOW_IPV6, FROM_CLIENT, FROM_SERVER, Flow, FlowKey,
    LifecycleEvent, SERVER_FIN, SERVER_FIN_ACKED, SYN_TIMES_CAPACITY, SynTime,
    tcp_flags::{ACK, FIN, RST, SYN},
};

use crate::{
    frame::{Frame, read},
    parse::{Family, Segment},
    zero,
};

#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

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

/// Which way a segment travels relative to the protected server.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → server, seen by XDP on ingress.
    FromClient,
    /// Server → client, seen by TC on egress.
    FromServer,
}

/// The segment's connection as a [`FlowKey`], oriented client → server.
#[inline(always)]
pub fn key<'a>(ctx: &impl Frame, segment: &Segment, direction: Direction) -> Option<&'a FlowKey> {
    let slot = match direction {
        Direction::FromClient => 0,
        Direction::FromServer => 1,
    };
    // SAFETY: a per-CPU slot, used only within this invocation, and each direction has its own.
    let key = unsafe { &mut *KEY_SCRATCH.get_ptr_mut(slot)? };
    let (source, destination) = match direction {
        Direction::FromClient => (&mut key.client_addr, &mut key.server_addr),
        Direction::FromServer => (&mut key.server_addr, &mut key.client_addr),
    };
    match segment.family {
        Family::V4 => {
            let addresses: [[u8; 4]; 2] =
                [read(ctx, segment.l3 + 12)?, read(ctx, segment.l3 + 16)?];
            source[..4].copy_from_slice(&addresses[0]);
            destination[..4].copy_from_slice(&addresses[1]);
            zero::clear(&mut source[4..]);
            zero::clear(&mut destination[4..]);
            key.family = FLOW_IPV4;
        }
        Family::V6 => {
            *source = read(ctx, segment.l3 + 8)?;
            *destination = read(ctx, segment.l3 + 24)?;
            key.family = FLOW_IPV6;
        }
    }
    (key.client_port, key.server_port) = match direction {
        Direction::FromClient => (segment.sport, segment.dport),
        Direction::FromServer => (segment.dport, segment.sport),
    };
    zero::clear(&mut key._pad);
    Some(key)
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// Starts tracking a connection whose opening segment (`segment`, from the client) was just
/// passed to the kernel, and reports it as `kind`.
#[inline(always)]
pub fn start(key: &FlowKey, segment: &Segment, kind: u8) {
    let now = now_ns();
    let flow = Flow {
        last_seen_ns: now,
        client_ack: segment.ack,
        // What the server has acknowledged so far: the client's next sequence number.
        server_ack: segment.seq,
        ..Flow::default()
    };
    // A full LRU map evicts its least recently used entry, so this only fails on allocation.
    let _ = FLOWS.insert(key, &flow, 0);
    let syn_time_ns = take_syn_time(key);
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

/// Remembers that a SYN was answered with a cookie at `now_ns`, for the handshake time.
#[inline(always)]
pub fn syn_answered(key: &FlowKey, now_ns: u64) {
    let (index, tag) = syn_slot(key);
    if let Some(slot) = SYN_TIMES.get_ptr_mut(index) {
        // SAFETY: a slot of a shared array; a racing writer can only make the handshake time
        // unknown (tag mismatch), never wrong by more than the race.
        unsafe {
            (*slot).time_ns = now_ns;
            (*slot).tag = tag;
        }
    }
}

/// When `key`'s SYN was answered, if its slot still holds it; the slot is emptied.
#[inline(always)]
fn take_syn_time(key: &FlowKey) -> u64 {
    let (index, tag) = syn_slot(key);
    let Some(slot) = SYN_TIMES.get_ptr_mut(index) else {
        return 0;
    };
    // SAFETY: as in syn_answered.
    unsafe {
        if (*slot).tag != tag {
            return 0;
        }
        (*slot).tag = 0;
        (*slot).time_ns
    }
}

#[inline(always)]
fn syn_slot(key: &FlowKey) -> (u32, u32) {
    let hash = key.hash();
    (hash & (SYN_TIMES_CAPACITY - 1), (hash >> 16) | 1)
}

/// The tracked flow `key`, refreshed by `segment`, with an event when the segment can change
/// the connection's state. `None` when the flow is not tracked.
#[inline(always)]
pub fn track(key: &FlowKey, segment: &Segment, direction: Direction) -> Option<()> {
    let flow = FLOWS.get_ptr_mut(key)?;
    let now = now_ns();
    // SAFETY: the value stays valid while this program runs; concurrent writers on other CPUs
    // can only make the idle time or a FIN record slightly stale, never unsafe.
    let flow = unsafe { &mut *flow };
    flow.last_seen_ns = now;
    let flags = segment.flags;
    let (own_fin, own_fin_acked, peer_fin, peer_fin_acked) = match direction {
        Direction::FromClient => (CLIENT_FIN, CLIENT_FIN_ACKED, SERVER_FIN, SERVER_FIN_ACKED),
        Direction::FromServer => (SERVER_FIN, SERVER_FIN_ACKED, CLIENT_FIN, CLIENT_FIN_ACKED),
    };
    let (peer_fin_seq, receiver_ack) = match direction {
        Direction::FromClient => (flow.server_fin_seq, flow.server_ack),
        Direction::FromServer => (flow.client_fin_seq, flow.client_ack),
    };
    let mut report_it = flags & (SYN | RST) != 0;
    if flags & FIN != 0 {
        // The FIN occupies the sequence number after the payload.
        let fin_seq = segment.seq.wrapping_add(u32::from(segment.payload_len()));
        match direction {
            Direction::FromClient => flow.client_fin_seq = fin_seq,
            Direction::FromServer => flow.server_fin_seq = fin_seq,
        }
        flow.fins = (flow.fins | own_fin) & !own_fin_acked;
        report_it = true;
    }
    if flags & ACK != 0 {
        if flow.fins & (peer_fin | peer_fin_acked) == peer_fin
            && segment.ack == peer_fin_seq.wrapping_add(1)
        {
            flow.fins |= peer_fin_acked;
            report_it = true;
        }
        match direction {
            Direction::FromClient => flow.client_ack = segment.ack,
            Direction::FromServer => flow.server_ack = segment.ack,
        }
    }
    if report_it {
        report(key, segment, direction, EVENT_SEGMENT, now, 0, receiver_ack);
    }
    Some(())
}

#[inline(always)]
fn report(
    key: &FlowKey,
    segment: &Segment,
    direction: Direction,
    kind: u8,
    time_ns: u64,
    syn_time_ns: u64,
    receiver_ack: u32,
) {
    let Some(mut entry) = EVENTS.reserve::<LifecycleEvent>(0) else {
        bump(EVENTS_LOST);
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
        (*event).kind = kind;
        (*event).direction = match direction {
            Direction::FromClient => FROM_CLIENT,
            Direction::FromServer => FROM_SERVER,
        };
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
