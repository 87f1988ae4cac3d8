//! One tracked connection, both of its ends, driven by the segments the data plane reports and
//! by the passing of time. No I/O: the daemon feeds it, tests feed it the same way.

use std::time::Duration;

use serde::Serialize;
use tcpguard_common::tcp_flags::{ACK, FIN, RST, SYN};

use crate::tcp_state::{SegmentKind, TcpState, transition};

/// One end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Client,
    Server,
}

impl Side {
    pub fn peer(self) -> Self {
        match self {
            Self::Client => Self::Server,
            Self::Server => Self::Client,
        }
    }
}

/// A segment as the state machine needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub from: Side,
    /// TCP flags byte ([`tcpguard_common::tcp_flags`]).
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload_len: u32,
    /// What the data plane last saw the receiver acknowledge (its RCV.NXT), when it knows:
    /// fresher than anything this machine saw, since plain data is not reported.
    pub receiver_ack: Option<u32>,
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CloseReason {
    /// The orderly close: FINs both ways, acknowledged.
    Fin,
    /// An acceptable RST from either end.
    Rst,
    /// Nothing was seen for longer than the state's timeout.
    Timeout,
}

impl CloseReason {
    pub const ALL: [Self; 3] = [Self::Fin, Self::Rst, Self::Timeout];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::Rst => "rst",
            Self::Timeout => "timeout",
        }
    }
}

/// How long each state may stay silent before its connection is reaped. Defaults follow
/// netfilter's conntrack, except ESTABLISHED, which lasts until a keepalive would have given up
/// (RFC 1122 §4.2.3.6: 2 hours idle, then Linux's 10 probes 75 s apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub syn_sent: Duration,
    pub syn_received: Duration,
    pub established: Duration,
    pub fin_wait: Duration,
    pub close_wait: Duration,
    pub closing: Duration,
    pub last_ack: Duration,
    /// Maximum segment lifetime; TIME-WAIT lasts twice this.
    pub msl: Duration,
    /// A LISTEN end in a connection still tracked (a handshake seen from its SYN that went no
    /// further).
    pub close: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            syn_sent: Duration::from_secs(120),
            syn_received: Duration::from_secs(60),
            established: Duration::from_secs(2 * 3600 + 10 * 75),
            fin_wait: Duration::from_secs(120),
            close_wait: Duration::from_secs(60),
            closing: Duration::from_secs(120),
            last_ack: Duration::from_secs(30),
            // Linux holds TIME-WAIT for 60 s.
            msl: Duration::from_secs(30),
            close: Duration::from_secs(10),
        }
    }
}

impl Timeouts {
    pub fn of(&self, state: TcpState) -> Duration {
        match state {
            TcpState::Closed | TcpState::Listen => self.close,
            TcpState::SynSent => self.syn_sent,
            TcpState::SynReceived => self.syn_received,
            TcpState::Established => self.established,
            TcpState::FinWait1 | TcpState::FinWait2 => self.fin_wait,
            TcpState::CloseWait => self.close_wait,
            TcpState::Closing => self.closing,
            TcpState::LastAck => self.last_ack,
            TcpState::TimeWait => 2 * self.msl,
        }
    }

    /// The longest any state may stay silent.
    pub fn longest(&self) -> Duration {
        TcpState::ALL
            .into_iter()
            .map(|state| self.of(state))
            .max()
            .unwrap_or_default()
    }
}

/// What this machine knows of one end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    pub state: TcpState,
    /// Sequence number of its SYN, once seen.
    syn_seq: Option<u32>,
    /// Sequence number of its FIN, once seen.
    fin_seq: Option<u32>,
    /// The acknowledgment number it last sent: its RCV.NXT.
    rcv_nxt: Option<u32>,
}

impl End {
    fn new(state: TcpState) -> Self {
        Self {
            state,
            syn_seq: None,
            fin_seq: None,
            rcv_nxt: None,
        }
    }

    /// Whether `ack` acknowledges this end's outstanding SYN or FIN. Without a record of it,
    /// an ACK in a state that waits for one is taken to be it.
    fn is_acked_by(&self, ack: u32) -> bool {
        let outstanding = match self.state {
            TcpState::SynSent | TcpState::SynReceived => self.syn_seq,
            TcpState::FinWait1 | TcpState::Closing | TcpState::LastAck => self.fin_seq,
            _ => return false,
        };
        outstanding.is_none_or(|seq| ack == seq.wrapping_add(1))
    }

    /// Whether `ack` acknowledges this end's FIN, outstanding or acknowledged before: what
    /// tells a FIN sent after the peer had this end's FIN from one that crossed it. Without a
    /// record of it, an end past its FIN takes any ACK to be it.
    fn fin_is_acked_by(&self, ack: u32) -> bool {
        match self.state {
            TcpState::FinWait2 | TcpState::TimeWait => {
                self.fin_seq.is_none_or(|seq| ack == seq.wrapping_add(1))
            }
            _ => self.is_acked_by(ack),
        }
    }
}

/// Both ends of one connection, the times that matter, and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub client: End,
    pub server: End,
    /// Nanoseconds on the data plane's clock (CLOCK_MONOTONIC).
    pub opened_ns: u64,
    pub last_activity_ns: u64,
    /// When both ends first stood in ESTABLISHED.
    pub established_ns: Option<u64>,
    /// Set once the connection is over: both ends CLOSED.
    pub closed: Option<CloseReason>,
    /// Set by the first acceptable RST, which decides the reason whatever follows.
    reset: bool,
}

impl Connection {
    /// A connection opened by a SYN the data plane passed to the kernel: the client in
    /// SYN-SENT, the server (a listener) about to receive it.
    pub fn from_syn(syn: &Segment, now_ns: u64) -> Self {
        let mut connection = Self::with_states(TcpState::Closed, TcpState::Listen, now_ns);
        connection.on_segment(syn, now_ns);
        connection
    }

    /// A connection whose handshake completed through a SYN cookie: the ACK in `ack`
    /// (seq = client's ISN + 1, ack = cookie + 1) established both ends at once. When the
    /// handshake's pure ACK was lost, the client's next segment completes it, and a FIN in it
    /// closes the client's end at once, as the kernel's socket built from it does.
    pub fn from_cookie_ack(ack: &Segment, now_ns: u64) -> Self {
        let mut connection =
            Self::with_states(TcpState::Established, TcpState::Established, now_ns);
        connection.established_ns = Some(now_ns);
        connection.client.syn_seq = Some(ack.seq.wrapping_sub(1));
        connection.server.syn_seq = Some(ack.ack.wrapping_sub(1));
        connection.client.rcv_nxt = Some(ack.ack);
        connection.server.rcv_nxt = Some(ack.seq);
        if ack.flags & FIN != 0 {
            connection.on_segment(ack, now_ns);
        }
        connection
    }

    /// A new connection on a tracked 4-tuple, opened by `opening`: an allow-listed client's
    /// SYN, or the server's SYN-ACK (its client in SYN-SENT, the server a listener).
    pub fn reopened_by(opening: &Segment, now_ns: u64) -> Self {
        match opening.from {
            Side::Client => Self::from_syn(opening, now_ns),
            Side::Server => {
                let mut connection = Self::with_states(TcpState::SynSent, TcpState::Listen, now_ns);
                connection.on_segment(opening, now_ns);
                connection
            }
        }
    }

    /// A connection whose start was not seen (adopted from an earlier daemon's flow map).
    pub fn adopted(now_ns: u64) -> Self {
        let mut connection =
            Self::with_states(TcpState::Established, TcpState::Established, now_ns);
        connection.established_ns = Some(now_ns);
        connection
    }

    /// Two ends in the given states, as a test or a scenario starts them.
    pub fn with_states(client: TcpState, server: TcpState, now_ns: u64) -> Self {
        Self {
            client: End::new(client),
            server: End::new(server),
            opened_ns: now_ns,
            last_activity_ns: now_ns,
            established_ns: None,
            closed: None,
            reset: false,
        }
    }

    pub fn end(&self, side: Side) -> &End {
        match side {
            Side::Client => &self.client,
            Side::Server => &self.server,
        }
    }

    fn end_mut(&mut self, side: Side) -> &mut End {
        match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        }
    }

    pub fn states(&self) -> (TcpState, TcpState) {
        (self.client.state, self.server.state)
    }

    /// What `segment` is to the end that receives it.
    pub fn classify(&self, segment: &Segment) -> SegmentKind {
        let receiver = self.end(segment.from.peer());
        let flags = segment.flags;
        let acks = flags & ACK != 0 && receiver.is_acked_by(segment.ack);
        if flags & RST != 0 {
            return if self.rst_is_acceptable(segment) {
                SegmentKind::Rst
            } else {
                SegmentKind::IgnoredRst
            };
        }
        let fin_acks = flags & ACK != 0 && receiver.fin_is_acked_by(segment.ack);
        match (flags & SYN != 0, flags & FIN != 0, flags & ACK != 0) {
            (true, _, false) => SegmentKind::Syn,
            (true, _, true) => SegmentKind::SynAck,
            (false, true, _) if fin_acks => SegmentKind::FinAcks,
            (false, true, _) => SegmentKind::Fin,
            (false, false, _) if acks => SegmentKind::Acks,
            (false, false, _) => SegmentKind::Ack,
        }
    }

    /// RFC 5961 §3.2: a RST is acceptable when its sequence number is exactly the receiver's
    /// RCV.NXT; in SYN-SENT (RFC 9293 §3.10.7.3) when it acknowledges the SYN. When this
    /// machine has never seen what the receiver expects, it cannot tell, and accepts.
    fn rst_is_acceptable(&self, segment: &Segment) -> bool {
        let receiver = self.end(segment.from.peer());
        match receiver.state {
            TcpState::Closed | TcpState::Listen => false,
            TcpState::SynSent => {
                segment.flags & ACK != 0
                    && receiver
                        .syn_seq
                        .is_none_or(|seq| segment.ack == seq.wrapping_add(1))
            }
            _ => segment
                .receiver_ack
                .or(receiver.rcv_nxt)
                .is_none_or(|expected| segment.seq == expected),
        }
    }

    /// Applies a segment seen at `now_ns`. Returns the kind it was judged to be, or `None`
    /// once the connection is over: a closed connection judges nothing and stays as it is.
    pub fn on_segment(&mut self, segment: &Segment, now_ns: u64) -> Option<SegmentKind> {
        if self.closed.is_some() {
            return None;
        }
        self.last_activity_ns = self.last_activity_ns.max(now_ns);
        if let Some(ack) = segment.receiver_ack {
            self.end_mut(segment.from.peer()).rcv_nxt = Some(ack);
        }
        let kind = self.classify(segment);
        let sender_side = segment.from;
        let (sender, receiver) = transition(
            self.end(sender_side).state,
            self.end(sender_side.peer()).state,
            kind,
        );
        let flags = segment.flags;
        let sender_end = self.end_mut(sender_side);
        sender_end.state = sender;
        if flags & SYN != 0 {
            sender_end.syn_seq = Some(segment.seq);
        }
        if flags & FIN != 0 {
            let syn = u32::from(flags & SYN != 0);
            sender_end.fin_seq = Some(segment.seq.wrapping_add(segment.payload_len + syn));
        }
        if flags & ACK != 0 && kind != SegmentKind::IgnoredRst {
            sender_end.rcv_nxt = Some(segment.ack);
        }
        self.end_mut(sender_side.peer()).state = receiver;
        if kind == SegmentKind::Rst {
            self.reset = true;
        }
        if self.established_ns.is_none()
            && self.states() == (TcpState::Established, TcpState::Established)
        {
            self.established_ns = Some(now_ns);
        }
        self.settle();
        Some(kind)
    }

    /// Traffic the data plane saw without reporting it (plain data): the connection is alive.
    pub fn touch(&mut self, now_ns: u64) {
        self.last_activity_ns = self.last_activity_ns.max(now_ns);
    }

    /// When the connection is reaped if nothing more is seen: the longest timeout of its two
    /// ends' states, from the last activity. `None` once it is over.
    pub fn deadline_ns(&self, timeouts: &Timeouts) -> Option<u64> {
        if self.closed.is_some() {
            return None;
        }
        // A CLOSED end waits for nothing: only the other end's state counts (TIME-WAIT
        // opposite a CLOSED end lasts 2·MSL, not longer).
        let wait = |state| match state {
            TcpState::Closed => Duration::ZERO,
            state => timeouts.of(state),
        };
        let silence = wait(self.client.state).max(wait(self.server.state));
        Some(
            self.last_activity_ns
                .saturating_add(u64::try_from(silence.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// Applies the passing of time: once the deadline is past, both ends are CLOSED. TIME-WAIT
    /// running out is the end of an orderly close; any other silence is a timeout.
    pub fn on_time(&mut self, now_ns: u64, timeouts: &Timeouts) {
        let Some(deadline) = self.deadline_ns(timeouts) else {
            return;
        };
        if now_ns < deadline {
            return;
        }
        let quiet = |state| matches!(state, TcpState::Closed | TcpState::TimeWait);
        let orderly = quiet(self.client.state) && quiet(self.server.state);
        self.client.state = TcpState::Closed;
        self.server.state = TcpState::Closed;
        self.closed = Some(if self.reset {
            CloseReason::Rst
        } else if orderly {
            CloseReason::Fin
        } else {
            CloseReason::Timeout
        });
    }

    /// Marks the connection over once both ends are CLOSED.
    fn settle(&mut self) {
        if self.states() == (TcpState::Closed, TcpState::Closed) {
            self.closed = Some(if self.reset {
                CloseReason::Rst
            } else {
                CloseReason::Fin
            });
        }
    }
}
