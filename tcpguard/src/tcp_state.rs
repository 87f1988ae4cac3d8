//! The TCP connection states of RFC 9293 (§3.3.2, figure 5) and the transitions a segment
//! causes at the end that sends it and at the end that receives it, as two tables in the
//! manner of netfilter's conntrack.

use std::fmt;

/// A connection state of one end (RFC 9293 §3.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    Closed,
    Listen,
    SynSent,
    SynReceived,
    Established,
    FinWait1,
    FinWait2,
    CloseWait,
    Closing,
    LastAck,
    TimeWait,
}

impl TcpState {
    pub const ALL: [Self; 11] = [
        Self::Closed,
        Self::Listen,
        Self::SynSent,
        Self::SynReceived,
        Self::Established,
        Self::FinWait1,
        Self::FinWait2,
        Self::CloseWait,
        Self::Closing,
        Self::LastAck,
        Self::TimeWait,
    ];

    /// The name RFC 9293 gives the state.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Closed => "CLOSED",
            Self::Listen => "LISTEN",
            Self::SynSent => "SYN-SENT",
            Self::SynReceived => "SYN-RECEIVED",
            Self::Established => "ESTABLISHED",
            Self::FinWait1 => "FIN-WAIT-1",
            Self::FinWait2 => "FIN-WAIT-2",
            Self::CloseWait => "CLOSE-WAIT",
            Self::Closing => "CLOSING",
            Self::LastAck => "LAST-ACK",
            Self::TimeWait => "TIME-WAIT",
        }
    }

    /// The state as a Prometheus label value: lower case, underscores.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Listen => "listen",
            Self::SynSent => "syn_sent",
            Self::SynReceived => "syn_received",
            Self::Established => "established",
            Self::FinWait1 => "fin_wait_1",
            Self::FinWait2 => "fin_wait_2",
            Self::CloseWait => "close_wait",
            Self::Closing => "closing",
            Self::LastAck => "last_ack",
            Self::TimeWait => "time_wait",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a segment is, as far as the states of its two ends go. "Ours" is the receiver's
/// outstanding SYN or FIN: a segment that acknowledges it is a different kind from one that
/// does not. The [`crate::connection`] module classifies segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SegmentKind {
    /// SYN without ACK: an active open.
    Syn,
    /// SYN+ACK.
    SynAck,
    /// FIN that does not acknowledge the receiver's FIN: if the receiver has sent one, this
    /// FIN was sent before it arrived (the two crossed).
    Fin,
    /// FIN that also acknowledges the receiver's SYN or FIN (its FIN whether or not an earlier
    /// segment acknowledged it).
    FinAcks,
    /// ACK (perhaps with data) that acknowledges nothing outstanding.
    Ack,
    /// ACK that acknowledges the receiver's SYN or FIN.
    Acks,
    /// RST with the sequence number the receiver expects (RFC 5961 §3.2), or, to an end in
    /// SYN-SENT, one that acknowledges its SYN.
    Rst,
    /// Any other RST: the receiver ignores it (at most it answers with a challenge ACK).
    IgnoredRst,
}

impl SegmentKind {
    pub const ALL: [Self; 8] = [
        Self::Syn,
        Self::SynAck,
        Self::Fin,
        Self::FinAcks,
        Self::Ack,
        Self::Acks,
        Self::Rst,
        Self::IgnoredRst,
    ];

    const fn column(self) -> usize {
        self as usize
    }
}

use TcpState::{
    CloseWait as CW, Closed as CL, Closing as CG, Established as ES, FinWait1 as F1,
    FinWait2 as F2, LastAck as LA, Listen as LI, SynReceived as SR, SynSent as SS, TimeWait as TW,
};

/// The receiver's next state, by its state (row, in [`TcpState::ALL`] order) and the kind of
/// segment it receives (column, in [`SegmentKind::ALL`] order).
#[rustfmt::skip]
const ON_RECEIVE: [[TcpState; 8]; 11] = [
    //            Syn SynAck Fin FinAcks Ack Acks Rst IgnoredRst
    /* CLOSED */ [CL, CL,    CL, CL,     CL, CL,  CL, CL],
    /* LISTEN */ [SR, LI,    LI, LI,     LI, LI,  LI, LI],
    // A SYN in SYN-SENT is a simultaneous open; the SYN-ACK of our SYN completes the open.
    /* SYN-SENT */ [SR, ES,  SS, SS,     SS, SS,  CL, SS],
    // The ACK of our SYN establishes; with a FIN on it, the peer is already closing.
    /* SYN-RCVD */ [SR, ES,  SR, CW,     SR, ES,  CL, SR],
    /* ESTAB */  [ES, ES,    CW, CW,     ES, ES,  CL, ES],
    // Our FIN acknowledged → FIN-WAIT-2; their FIN first → CLOSING (simultaneous close);
    // both at once → TIME-WAIT.
    /* FIN-WAIT-1 */ [F1, F1, CG, TW,    F1, F2,  CL, F1],
    /* FIN-WAIT-2 */ [F2, F2, TW, TW,    F2, F2,  CL, F2],
    /* CLOSE-WAIT */ [CW, CW, CW, CW,    CW, CW,  CL, CW],
    /* CLOSING */ [CG, CG,   CG, TW,     CG, TW,  CL, CG],
    /* LAST-ACK */ [LA, LA,  LA, CL,     LA, CL,  CL, LA],
    // A retransmitted FIN is answered again and restarts the 2·MSL wait; a RST ends it
    // (RFC 9293; Linux does the same unless tcp_rfc1337 is set).
    /* TIME-WAIT */ [TW, TW, TW, TW,     TW, TW,  CL, TW],
];

/// The sender's next state, by its state and the kind of segment it sends.
#[rustfmt::skip]
const ON_SEND: [[TcpState; 8]; 11] = [
    //            Syn SynAck Fin FinAcks Ack Acks Rst IgnoredRst
    /* CLOSED */ [SS, CL,    CL, CL,     CL, CL,  CL, CL],
    /* LISTEN */ [LI, SR,    LI, LI,     LI, LI,  LI, LI],
    /* SYN-SENT */ [SS, SR,  SS, SS,     SS, SS,  CL, SS],
    // CLOSE in SYN-RECEIVED sends a FIN and goes to FIN-WAIT-1.
    /* SYN-RCVD */ [SR, SR,  F1, F1,     SR, SR,  CL, SR],
    /* ESTAB */  [ES, ES,    F1, F1,     ES, ES,  CL, ES],
    /* FIN-WAIT-1 */ [F1, F1, F1, F1,    F1, F1,  CL, F1],
    /* FIN-WAIT-2 */ [F2, F2, F2, F2,    F2, F2,  CL, F2],
    // A FIN that does not acknowledge the peer's FIN was sent before that FIN arrived: the FINs
    // crossed (simultaneous close). The sender was ESTABLISHED, went to FIN-WAIT-1, and the
    // peer's FIN, which this machine saw leave first, takes it on to CLOSING.
    /* CLOSE-WAIT */ [CW, CW, CG, LA,    CW, CW,  CL, CW],
    /* CLOSING */ [CG, CG,   CG, CG,     CG, CG,  CL, CG],
    /* LAST-ACK */ [LA, LA,  LA, LA,     LA, LA,  CL, LA],
    /* TIME-WAIT */ [TW, TW, TW, TW,     TW, TW,  CL, TW],
];

/// The states of the sender and the receiver of a segment of `kind` once it has been sent and
/// received. An ignored RST changes neither: it is most likely not from the end it claims.
pub fn transition(sender: TcpState, receiver: TcpState, kind: SegmentKind) -> (TcpState, TcpState) {
    (
        ON_SEND[sender as usize][kind.column()],
        ON_RECEIVE[receiver as usize][kind.column()],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_follow_the_state_order() {
        for (row, state) in TcpState::ALL.iter().enumerate() {
            assert_eq!(*state as usize, row, "{state}");
        }
        for (column, kind) in SegmentKind::ALL.iter().enumerate() {
            assert_eq!(kind.column(), column, "{kind:?}");
        }
    }

    /// Every (sender state, receiver state, segment kind): the rules that hold across the
    /// whole table.
    #[test]
    fn every_pair_of_states_and_every_segment() {
        for sender in TcpState::ALL {
            for receiver in TcpState::ALL {
                for kind in SegmentKind::ALL {
                    let (s, r) = transition(sender, receiver, kind);
                    let case = format!("{sender} sends {kind:?} to {receiver}: {s}, {r}");
                    match kind {
                        SegmentKind::Rst => {
                            assert_eq!(
                                r,
                                if receiver == LI { LI } else { CL },
                                "{case}: an acceptable RST aborts all but a listener"
                            );
                            let sender_after = if sender == LI { LI } else { CL };
                            assert_eq!(s, sender_after, "{case}: the end that resets is done");
                        }
                        SegmentKind::IgnoredRst => {
                            assert_eq!((s, r), (sender, receiver), "{case}: ignored RST");
                        }
                        _ => {}
                    }
                    if receiver == CL {
                        assert_eq!(r, CL, "{case}: a closed end stays closed");
                    }
                    if matches!(
                        kind,
                        SegmentKind::Ack | SegmentKind::Syn | SegmentKind::SynAck
                    ) && !matches!(receiver, LI | SS | SR)
                    {
                        assert_eq!(r, receiver, "{case}: only the opening reacts to SYNs");
                    }
                    if matches!(kind, SegmentKind::Fin | SegmentKind::FinAcks) {
                        assert!(
                            !matches!(s, ES | SR | CW),
                            "{case}: an end that sent its FIN has closed its side"
                        );
                    }
                    if r == TW {
                        assert!(
                            matches!(receiver, F1 | F2 | CG | TW),
                            "{case}: only the end that closed first reaches TIME-WAIT"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn names_and_labels_are_distinct() {
        for (i, a) in TcpState::ALL.iter().enumerate() {
            for b in &TcpState::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
                assert_ne!(a.label(), b.label());
            }
        }
    }
}
