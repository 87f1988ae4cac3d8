//! The flow map: connections tcpguard tracks, keyed by their 4-tuple, and the lifecycle events
//! the data plane reports about them.

use crate::report::{Direction, EventKind, UnknownValue};

/// [`FlowKey::family`] of an IPv4 connection.
pub const FLOW_IPV4: u8 = 4;
/// [`FlowKey::family`] of an IPv6 connection.
pub const FLOW_IPV6: u8 = 6;

/// A connection's 4-tuple, oriented client → server whichever way the packet went, so that the
/// XDP program (ingress) and the TC program (egress) find the same entry. IPv4 addresses sit in
/// the first four bytes, the rest zero. Ports are in host byte order. Aligned to 8 so that the
/// data plane can write and hash it a word at a time.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// An IPv4 connection's key in its flow map ([`crate::maps::FLOWS_V4`]): [`FlowKey`] without
/// the room for IPv6 addresses and the family. The kernel hashes a flow map's key on every
/// lookup, and hashes these 12 bytes in one round where a whole FlowKey takes four, so the
/// flows of each family are kept in a map of their own (IPv6 ones keyed by the whole FlowKey).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKeyV4 {
    pub client_addr: [u8; 4],
    pub server_addr: [u8; 4],
    pub client_port: u16,
    pub server_port: u16,
}

impl FlowKey {
    /// The key of this IPv4 connection in [`crate::maps::FLOWS_V4`]; meaningless for IPv6.
    #[inline(always)]
    pub fn v4(&self) -> FlowKeyV4 {
        let address = |bytes: &[u8; 16]| [bytes[0], bytes[1], bytes[2], bytes[3]];
        FlowKeyV4 {
            client_addr: address(&self.client_addr),
            server_addr: address(&self.server_addr),
            client_port: self.client_port,
            server_port: self.server_port,
        }
    }

    /// [`FlowKey::v4`] as the two words of an 8-aligned [`FlowKeyV4`] buffer (its last four
    /// bytes zero), on a little-endian machine: BPF as tcpguard builds it (bpfel), and x86 and
    /// arm64 hosts. Each address's first four bytes are the low half of its field's first
    /// word. The data plane builds its IPv4 lookup key so, in two stores: field by field, LLVM
    /// reads the server's address a byte at a time, which cost 4 ns per tracked segment.
    #[inline(always)]
    pub fn v4_words(&self) -> [u64; 2] {
        let first_word = |field: &[u8; 16]| {
            let (word, _) = field.split_at(8);
            u64::from_le_bytes(word.try_into().unwrap_or_default())
        };
        let ports = u64::from(self.client_port) | u64::from(self.server_port) << 16;
        [
            first_word(&self.client_addr) & 0xffff_ffff | first_word(&self.server_addr) << 32,
            ports,
        ]
    }
}

impl FlowKeyV4 {
    /// [`FlowKey::v4_words`] of an IPv4 segment's connection, straight from its headers:
    /// `addresses` are the IPv4 header's source and destination (its bytes 12 to 19), the ports
    /// the TCP header's, in host order. The data plane looks a tracked segment's flow up with
    /// these, without building the whole FlowKey, which only an event needs.
    #[inline(always)]
    pub fn words_of_segment(
        addresses: [u8; 8],
        source_port: u16,
        destination_port: u16,
        direction: Direction,
    ) -> [u64; 2] {
        let addresses = u64::from_le_bytes(addresses);
        let ports = |client: u16, server: u16| u64::from(client) | u64::from(server) << 16;
        match direction {
            Direction::FromClient => [addresses, ports(source_port, destination_port)],
            // The halves swapped: the client's address is the destination.
            Direction::FromServer => [
                addresses.rotate_left(32),
                ports(destination_port, source_port),
            ],
        }
    }
}

// FlowKey::v4_words, and the data plane's flow keys with it, take a little-endian machine.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "tcpguard's flow keys are laid out for a little-endian machine"
);

impl From<FlowKeyV4> for FlowKey {
    fn from(key: FlowKeyV4) -> Self {
        let address = |bytes: [u8; 4]| {
            let mut field = [0; 16];
            field[..4].copy_from_slice(&bytes);
            field
        };
        Self {
            client_addr: address(key.client_addr),
            server_addr: address(key.server_addr),
            client_port: key.client_port,
            server_port: key.server_port,
            family: FLOW_IPV4,
            _pad: [0; 3],
        }
    }
}

/// What the data plane keeps per tracked connection: enough to refresh its idle timer and to
/// report the segments that change its state without reporting the ones that do not (see
/// [`crate::report`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) of the last segment either way.
    pub last_seen_ns: u64,
    /// Sequence number of the client's last SYN or FIN.
    pub client_control_seq: u32,
    /// Sequence number of the server's last SYN or FIN.
    pub server_control_seq: u32,
    /// Acknowledgment number of the client's last segment: its RCV.NXT.
    pub client_ack: u32,
    /// Acknowledgment number of the server's last segment: its RCV.NXT.
    pub server_ack: u32,
    /// [`crate::CLIENT_UNACKED`], [`crate::SERVER_UNACKED`]: which end's SYN or FIN awaits
    /// its ACK.
    pub unacked: u8,
    /// 1 from the ACK that returned one of tcpguard's own cookies until a later segment from
    /// the client finds the socket the kernel built from it. The kernel may drop that ACK after
    /// XDP passed it (a full accept queue, say); until then each client segment must return the
    /// cookie again, which the kernel accepts from any ACK, as it does its own cookies.
    pub awaiting_socket: u8,
    pub _pad: [u8; 2],
    /// The low 32 bits of the kernel's tick count (`jiffies`) when `last_seen_ns` was last
    /// written. A segment compares the tick count, one load, with this, and reads the clock
    /// only when enough ticks have passed to write it again.
    pub seen_tick: u32,
}

/// When a SYN was answered with a cookie, in the slot of [`crate::maps::SYN_TIMES`] its
/// 4-tuple hashes to. Slots are overwritten freely (a flood churns through them); the tag tells
/// whether the slot still holds this 4-tuple's SYN. One word, so that a flood, which writes a
/// random slot per SYN, touches as little memory as it can.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynTime(pub u64);

impl SynTime {
    /// Bits of the time: `bpf_ktime_get_ns` modulo 2^48, about 78 hours.
    const TIME_BITS: u32 = 48;
    const TIME_MASK: u64 = (1 << Self::TIME_BITS) - 1;

    /// `time_ns` under `tag` (16 bits, never 0: 0 marks an empty slot).
    #[inline(always)]
    pub fn new(tag: u16, time_ns: u64) -> Self {
        Self(u64::from(tag) << Self::TIME_BITS | time_ns & Self::TIME_MASK)
    }

    #[inline(always)]
    pub fn tag(self) -> u16 {
        (self.0 >> Self::TIME_BITS) as u16
    }

    /// The time this slot holds, as a `bpf_ktime_get_ns` value at or before `now_ns`.
    #[inline(always)]
    pub fn time_before(self, now_ns: u64) -> u64 {
        now_ns.wrapping_sub(now_ns.wrapping_sub(self.0) & Self::TIME_MASK)
    }
}

impl FlowKey {
    /// A hash of the 4-tuple for [`SynTime`] slots: the addresses' 32-bit words folded with XOR
    /// (the server's rotated, so that equal words of the two ends do not cancel) beside the two
    /// ports, through SplitMix64's finalizer, whose every output bit depends on every input bit.
    /// Bits 32 and up pick the slot and make the tag. An IPv4 4-tuple is one word per address,
    /// so its fold loses nothing. Cheap rather than strong: a sender who makes two 4-tuples
    /// collide only loses a handshake time.
    #[inline(always)]
    pub fn hash(&self) -> u64 {
        let word = |bytes: &[u8; 16], i: usize| {
            u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]])
        };
        let mut addresses = 0;
        for i in [0, 4, 8, 12] {
            addresses ^= word(&self.client_addr, i) ^ word(&self.server_addr, i).rotate_left(16);
        }
        let ports = u32::from(self.client_port) << 16 | u32::from(self.server_port);
        let mut z = u64::from(addresses) << 32 | u64::from(ports);
        z = (z ^ z >> 30).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ z >> 27).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ z >> 31
    }
}

/// One record in the lifecycle ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LifecycleEvent {
    pub key: FlowKey,
    /// `bpf_ktime_get_ns` when the segment was seen.
    pub time_ns: u64,
    /// When the data plane saw this flow's SYN answered, for the handshake time of
    /// [`EventKind::CookieHandshake`] and [`EventKind::KernelHandshake`]; 0 when it no longer
    /// knows.
    pub syn_time_ns: u64,
    pub seq: u32,
    pub ack: u32,
    /// The acknowledgment number the receiving end last sent (its RCV.NXT), which an
    /// acceptable RST must carry as its sequence number (RFC 5961 §3.2).
    pub receiver_ack: u32,
    /// TCP payload bytes in the segment.
    pub payload_len: u16,
    /// TCP flags byte ([`crate::tcp_flags`]).
    pub flags: u8,
    /// An [`EventKind`], as written by the data plane; read it with [`LifecycleEvent::kind`].
    pub kind: u8,
    /// A [`Direction`]; read it with [`LifecycleEvent::direction`].
    pub direction: u8,
    pub _pad: [u8; 7],
}

impl LifecycleEvent {
    /// What the record reports, or the unknown byte.
    pub fn kind(&self) -> Result<EventKind, UnknownValue> {
        EventKind::try_from(self.kind)
    }

    /// Which way the segment went, or the unknown byte.
    pub fn direction(&self) -> Result<Direction, UnknownValue> {
        Direction::try_from(self.direction)
    }
}

/// Bytes of lifecycle ring buffer. A record takes 88 bytes with the ring's header, so this holds
/// about 12k events: seconds of connection churn at rates far beyond what the daemon reads.
pub const EVENT_RING_BYTES: u32 = 1 << 20;

/// Index in [`crate::maps::EVENT_STATS`]: events written to the ring.
pub const EVENTS_SENT: u32 = 0;
/// Index in [`crate::maps::EVENT_STATS`]: events lost because the ring was full.
pub const EVENTS_LOST: u32 = 1;

/// A source address, as the key of the per-source limit map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The client's address as a [`SourceKey`].
    pub fn source(&self) -> SourceKey {
        SourceKey {
            addr: self.client_addr,
            family: self.family,
            _pad: [0; 3],
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all #[repr(C)], made of integers and byte arrays, padding spelled out as fields.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowKeyV4 {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::LifecycleEvent {}
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::SynTime {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::align_of::<FlowKey>(), 8);
        assert_eq!(size_of::<FlowKeyV4>(), 12);
        assert_eq!(size_of::<SynTime>(), 8);
        assert_eq!(size_of::<Flow>(), 32);
        assert_eq!(size_of::<LifecycleEvent>(), 80);
        assert_eq!(size_of::<SourceKey>(), 20);
    }

    /// A flood's 4-tuples spread over the SYN-time slots about as a random function would
    /// (65,536 keys into 65,536 slots fill 1 - 1/e ≈ 63% of them), and the ends are ordered.
    #[test]
    fn syn_slots_spread_a_floods_4_tuples() {
        extern crate std;
        let slot = |key: &FlowKey| (key.hash() >> 32) as u16;
        let mut used = std::vec![false; 65_536];
        for n in 0..65_536u32 {
            let mut key = FlowKey {
                client_port: (n * 7919) as u16,
                server_port: 443,
                family: crate::FLOW_IPV4,
                ..FlowKey::default()
            };
            key.client_addr[..4].copy_from_slice(&[
                10,
                128 + (n >> 16) as u8,
                (n >> 8) as u8,
                n as u8,
            ]);
            key.server_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
            used[usize::from(slot(&key))] = true;
        }
        let filled = used.iter().filter(|&&u| u).count();
        assert!(
            (38_000..45_000).contains(&filled),
            "{filled} slots of 65536"
        );

        let mut key = FlowKey::default();
        key.client_addr[0] = 1;
        key.server_addr[0] = 2;
        let mut swapped = FlowKey::default();
        swapped.client_addr[0] = 2;
        swapped.server_addr[0] = 1;
        assert_ne!(key.hash(), swapped.hash());
    }

    #[test]
    fn an_ipv4_key_and_its_flow_map_key_convert_both_ways() {
        let key = FlowKey {
            client_addr: [192, 0, 2, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            server_addr: [198, 51, 100, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            client_port: 40_000,
            server_port: 443,
            family: FLOW_IPV4,
            _pad: [0; 3],
        };
        let v4 = key.v4();
        assert_eq!(
            v4,
            FlowKeyV4 {
                client_addr: [192, 0, 2, 7],
                server_addr: [198, 51, 100, 1],
                client_port: 40_000,
                server_port: 443,
            }
        );
        assert_eq!(FlowKey::from(v4), key);
    }

    /// The words the data plane looks IPv4 flows up with are the bytes of [`FlowKey::v4`].
    #[test]
    fn an_ipv4_keys_words_are_its_flow_map_key() {
        let mut key = FlowKey {
            client_port: 0xa1b2,
            server_port: 0x01bb,
            family: FLOW_IPV4,
            ..FlowKey::default()
        };
        key.client_addr[..4].copy_from_slice(&[192, 0, 2, 7]);
        key.server_addr[..4].copy_from_slice(&[198, 51, 100, 200]);
        let words = key.v4_words();
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&words[0].to_ne_bytes());
        bytes[8..].copy_from_slice(&words[1].to_ne_bytes());
        let v4 = key.v4();
        let mut expected = [0u8; 16];
        expected[..4].copy_from_slice(&v4.client_addr);
        expected[4..8].copy_from_slice(&v4.server_addr);
        expected[8..10].copy_from_slice(&v4.client_port.to_ne_bytes());
        expected[10..12].copy_from_slice(&v4.server_port.to_ne_bytes());
        assert_eq!(bytes, expected);
    }

    /// The words looked up for a segment, in either direction, are those of its connection's key.
    #[test]
    fn a_segments_words_are_its_connections_key_either_way() {
        let (client, server) = ([192, 0, 2, 7], [198, 51, 100, 200]);
        let (client_port, server_port) = (0xa1b2, 0x01bb);
        let mut key = FlowKey {
            client_port,
            server_port,
            family: FLOW_IPV4,
            ..FlowKey::default()
        };
        key.client_addr[..4].copy_from_slice(&client);
        key.server_addr[..4].copy_from_slice(&server);
        let header = |source: [u8; 4], destination: [u8; 4]| {
            let mut addresses = [0; 8];
            addresses[..4].copy_from_slice(&source);
            addresses[4..].copy_from_slice(&destination);
            addresses
        };
        assert_eq!(
            FlowKeyV4::words_of_segment(
                header(client, server),
                client_port,
                server_port,
                Direction::FromClient
            ),
            key.v4_words()
        );
        assert_eq!(
            FlowKeyV4::words_of_segment(
                header(server, client),
                server_port,
                client_port,
                Direction::FromServer
            ),
            key.v4_words()
        );
    }

    #[test]
    fn a_syn_time_keeps_its_tag_and_its_time_across_the_48_bit_wrap() {
        let answered = (1 << 48) - 1_000;
        let slot = SynTime::new(0xbeef, answered);
        assert_eq!(slot.tag(), 0xbeef);
        assert_eq!(slot.time_before(answered + 5_000), answered);
        assert_eq!(slot.time_before(answered), answered);
    }
}
