//! The contract between the planes: which segments of a tracked flow the data plane reports,
//! and what the records it writes mean. The daemon's state machine changes a state only on a
//! SYN, a FIN, an RST, or an ACK of the receiver's outstanding SYN or FIN (RFC 9293 §3.10.7);
//! those are the segments reported, and nothing else. The eBPF programs call [`Flow::observe`];
//! the daemon's property test runs the same function.

use core::fmt;

use crate::{
    Flow,
    tcp_flags::{ACK, FIN, RST, SYN},
};

/// [`Flow::unacked`] bit: the client's SYN or FIN at [`Flow::client_control_seq`] is not yet
/// acknowledged.
pub const CLIENT_UNACKED: u8 = 1 << 0;
/// [`Flow::unacked`] bit: the server's SYN or FIN at [`Flow::server_control_seq`] is not yet
/// acknowledged.
pub const SERVER_UNACKED: u8 = 1 << 1;

/// What a [`crate::LifecycleEvent`] reports.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// An ACK with a valid SYN cookie was passed to the kernel, which builds an established
    /// connection from it; the flow is now tracked.
    CookieHandshake = 1,
    /// A SYN from an allow-listed source, passed to the kernel without a cookie; the flow is
    /// now tracked from its first segment.
    AllowedSyn = 2,
    /// A segment of a tracked flow that [`Flow::observe`] says the state machine needs.
    Segment = 3,
    /// An ACK completing a handshake the kernel answered itself (a SYN outside an attack); the
    /// flow is now tracked.
    KernelHandshake = 4,
}

/// Which way a segment travels relative to the protected server.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → server, seen by XDP on ingress.
    FromClient = 0,
    /// Server → client, seen by TC on egress.
    FromServer = 1,
}

/// A byte of a [`crate::LifecycleEvent`] that names no [`EventKind`] or [`Direction`]: a
/// data plane built from another contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownValue {
    /// The field: `"kind"` or `"direction"`.
    pub field: &'static str,
    pub value: u8,
}

impl fmt::Display for UnknownValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let accepted = match self.field {
            "kind" => "1 to 4",
            _ => "0 (from the client) or 1 (from the server)",
        };
        write!(
            f,
            "lifecycle event {} {} is unknown; {accepted} would be accepted",
            self.field, self.value
        )
    }
}

impl TryFrom<u8> for EventKind {
    type Error = UnknownValue;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::CookieHandshake),
            2 => Ok(Self::AllowedSyn),
            3 => Ok(Self::Segment),
            4 => Ok(Self::KernelHandshake),
            value => Err(UnknownValue {
                field: "kind",
                value,
            }),
        }
    }
}

impl TryFrom<u8> for Direction {
    type Error = UnknownValue;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(Self::FromClient),
            1 => Ok(Self::FromServer),
            value => Err(UnknownValue {
                field: "direction",
                value,
            }),
        }
    }
}

/// The fields of a TCP header the reporting decision reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentHeader {
    /// TCP flags byte ([`crate::tcp_flags`]).
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// TCP payload bytes.
    pub payload_len: u16,
}

impl SegmentHeader {
    /// The sequence number of the SYN or FIN this segment carries: a FIN occupies the number
    /// after the payload (and after a SYN on the same segment).
    #[inline(always)]
    fn control_seq(&self) -> u32 {
        if self.flags & FIN != 0 {
            let syn = u32::from(self.flags & SYN != 0);
            self.seq
                .wrapping_add(u32::from(self.payload_len))
                .wrapping_add(syn)
        } else {
            self.seq
        }
    }
}

impl Flow {
    /// A flow tracked from the client's `opening` segment, seen at `now_ns`: an allow-listed
    /// client's SYN, or the ACK that completed a handshake.
    #[inline(always)]
    pub fn opened_by(opening: &SegmentHeader, now_ns: u64) -> Self {
        let mut flow = Self {
            last_seen_ns: now_ns,
            ..Self::default()
        };
        flow.client_ack = opening.ack;
        // What the server will acknowledge: the client's next sequence number.
        flow.server_ack = opening
            .seq
            .wrapping_add(u32::from(opening.flags & SYN != 0));
        if opening.flags & (SYN | FIN) != 0 {
            flow.client_control_seq = opening.control_seq();
            flow.unacked = CLIENT_UNACKED;
        }
        flow
    }

    /// Applies `segment`, travelling `direction`, to what the data plane keeps of the flow.
    /// Returns, when the state machine needs the segment, the acknowledgment number its
    /// receiver last sent (RCV.NXT, which an acceptable RST must carry as its sequence number,
    /// RFC 5961 §3.2); `None` when the segment cannot change either end's state: data, pure
    /// ACKs and window updates that acknowledge no outstanding SYN or FIN.
    #[inline(always)]
    pub fn observe(&mut self, direction: Direction, segment: &SegmentHeader) -> Option<u32> {
        let flags = segment.flags;
        // Most segments: data or a pure ACK while no SYN or FIN awaits its ACK either way. Only
        // the acknowledgment is kept; the rest below could change nothing. Decided first, from
        // two loads, because every tracked segment pays for it.
        if flags & (SYN | FIN | RST) == 0 && self.unacked == 0 {
            if flags & ACK != 0 {
                self.record_ack(direction, segment.ack);
            }
            return None;
        }
        let (own, peer, peer_control_seq, receiver_ack) = match direction {
            Direction::FromClient => (
                CLIENT_UNACKED,
                SERVER_UNACKED,
                self.server_control_seq,
                self.server_ack,
            ),
            Direction::FromServer => (
                SERVER_UNACKED,
                CLIENT_UNACKED,
                self.client_control_seq,
                self.client_ack,
            ),
        };
        let mut needed = flags & (SYN | FIN | RST) != 0;
        if flags & ACK != 0 {
            // The ACK of the peer's SYN takes SYN-RECEIVED to ESTABLISHED; of its FIN,
            // FIN-WAIT-1 to FIN-WAIT-2, CLOSING to TIME-WAIT, LAST-ACK to CLOSED.
            if self.unacked & peer != 0 && segment.ack == peer_control_seq.wrapping_add(1) {
                self.unacked &= !peer;
                needed = true;
            }
            self.record_ack(direction, segment.ack);
        }
        if flags & (SYN | FIN) != 0 {
            match direction {
                Direction::FromClient => self.client_control_seq = segment.control_seq(),
                Direction::FromServer => self.server_control_seq = segment.control_seq(),
            }
            self.unacked |= own;
        }
        needed.then_some(receiver_ack)
    }

    /// The acknowledgment number of a segment travelling `direction`: its sender's RCV.NXT.
    #[inline(always)]
    fn record_ack(&mut self, direction: Direction, ack: u32) {
        let own_ack = match direction {
            Direction::FromClient => &mut self.client_ack,
            Direction::FromServer => &mut self.server_ack,
        };
        // Written only when it moves: a busy flow's segments, on the CPUs of its two
        // directions, should not all write its cache line.
        if *own_ack != ack {
            *own_ack = ack;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp_flags::PSH;

    fn header(flags: u8, seq: u32, ack: u32, payload_len: u16) -> SegmentHeader {
        SegmentHeader {
            flags,
            seq,
            ack,
            payload_len,
        }
    }

    #[test]
    fn kinds_and_directions_round_trip_and_unknown_bytes_are_errors() {
        for kind in [
            EventKind::CookieHandshake,
            EventKind::AllowedSyn,
            EventKind::Segment,
            EventKind::KernelHandshake,
        ] {
            assert_eq!(EventKind::try_from(kind as u8), Ok(kind));
        }
        for direction in [Direction::FromClient, Direction::FromServer] {
            assert_eq!(Direction::try_from(direction as u8), Ok(direction));
        }
        for value in [0u8, 5, 255] {
            assert_eq!(
                EventKind::try_from(value),
                Err(UnknownValue {
                    field: "kind",
                    value
                })
            );
        }
        let error = Direction::try_from(2).unwrap_err();
        extern crate std;
        use std::string::ToString as _;
        assert_eq!(
            error.to_string(),
            "lifecycle event direction 2 is unknown; 0 (from the client) or 1 (from the \
             server) would be accepted"
        );
    }

    /// An allow-listed client's handshake: the SYN-ACK is reported, and so is the client's
    /// ACK that completes the handshake, which the server needs to leave SYN-RECEIVED.
    #[test]
    fn the_ack_completing_an_allowed_handshake_is_reported() {
        let mut flow = Flow::opened_by(&header(SYN, 1000, 0, 0), 1);
        assert_eq!(flow.server_ack, 1001);
        let syn_ack = header(SYN | ACK, 5000, 1001, 0);
        assert_eq!(flow.observe(Direction::FromServer, &syn_ack), Some(0));
        let ack = header(ACK, 1001, 5001, 0);
        assert_eq!(flow.observe(Direction::FromClient, &ack), Some(1001));
        // Data after the handshake changes nothing.
        let data = header(ACK | PSH, 1001, 5001, 100);
        assert_eq!(flow.observe(Direction::FromClient, &data), None);
        assert_eq!(flow.observe(Direction::FromServer, &data), None);
    }

    #[test]
    fn the_ack_of_a_fin_is_reported_once() {
        let mut flow = Flow::opened_by(&header(ACK, 1001, 5001, 0), 1);
        let fin = header(FIN | ACK | PSH, 1001, 5001, 10);
        assert_eq!(flow.observe(Direction::FromClient, &fin), Some(1001));
        assert_eq!(flow.client_control_seq, 1011);
        // An ACK short of the FIN (the data only) is not the ACK of the FIN.
        assert_eq!(
            flow.observe(Direction::FromServer, &header(ACK, 5001, 1011, 0)),
            None
        );
        let acks_fin = header(ACK, 5001, 1012, 0);
        // What the client last acknowledged: the RST check's expectation at the client.
        assert_eq!(flow.observe(Direction::FromServer, &acks_fin), Some(5001));
        assert_eq!(flow.observe(Direction::FromServer, &acks_fin), None);
    }

    #[test]
    fn resets_are_always_reported() {
        let mut flow = Flow::opened_by(&header(ACK, 1001, 5001, 0), 1);
        assert_eq!(
            flow.observe(Direction::FromServer, &header(RST, 5001, 0, 0)),
            Some(5001)
        );
    }
}
