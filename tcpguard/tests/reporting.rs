//! The contract between the planes, property-tested: for random conversations between two TCP
//! ends, of every lifecycle and origin, the states the daemon's state machine reaches from the
//! segments the data plane reports ([`Flow::observe`]) equal the states it reaches from every
//! segment of the flow.
//!
//! The data plane sits at the server's host: it sees a client's segment when it arrives there
//! (XDP) and a server's segment when it leaves (TC egress). A segment in flight the other way
//! is not seen yet; that is how FINs cross in a simultaneous close.

use std::collections::VecDeque;

use proptest::prelude::*;
use tcpguard::{
    connection::{Connection, Segment, Side},
    tcp_state::TcpState,
};
use tcpguard_common::{
    Direction, Flow, SegmentHeader,
    tcp_flags::{ACK, FIN, PSH, RST, SYN},
};

const CLIENT_ISN: u32 = 0xffff_ff00;
const SERVER_ISN: u32 = 7_000;

/// How the conversation starts, and so how the data plane comes to track it.
#[derive(Clone, Copy, Debug)]
enum Origin {
    /// An allow-listed client's SYN, tracked from the SYN.
    Allowed,
    /// An allow-listed client's SYN crossing the server's own SYN to the same 4-tuple.
    SimultaneousOpen,
    /// A cookie (or the kernel's own handshake), tracked from the ACK that completes it.
    Handshake,
}

/// What one end of the conversation may do next.
#[derive(Clone, Copy, Debug)]
enum Action {
    /// The oldest segment in flight from this end arrives at the other.
    Deliver,
    Data(u16),
    Fin,
    /// A pure ACK of what this end has received (a delayed ACK coming due).
    Ack,
    /// This end's FIN again, as a retransmission timer would send it.
    RetransmitFin,
    Rst,
}

/// One TCP end, as far as the segments it sends go: in-order delivery, no loss.
#[derive(Clone, Debug)]
struct End {
    /// SYN sent, not yet acknowledged.
    syn_pending: bool,
    /// The handshake is over at this end.
    open: bool,
    snd_nxt: u32,
    rcv_nxt: u32,
    fin_sent: bool,
    /// Sequence number of its FIN, once sent.
    fin_seq: u32,
    in_flight: VecDeque<Segment>,
}

impl End {
    fn new(isn: u32) -> Self {
        Self {
            syn_pending: false,
            open: false,
            snd_nxt: isn,
            rcv_nxt: 0,
            fin_sent: false,
            fin_seq: 0,
            in_flight: VecDeque::new(),
        }
    }
}

/// Two ends, and the two state machines fed at the server's host.
struct Conversation {
    client: End,
    server: End,
    reset: bool,
    /// Whether the data plane tracks the flow from the client's SYN (an allow-listed source)
    /// rather than from the ACK that completes the handshake.
    from_syn: bool,
    /// Fed every segment of the flow.
    every: Option<Connection>,
    /// Fed only what the data plane reports.
    reported: Option<Connection>,
    flow: Flow,
    now_ns: u64,
    /// Segments seen at the server's host, for the failure message.
    seen: Vec<Segment>,
}

impl Conversation {
    fn end(&mut self, side: Side) -> &mut End {
        match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        }
    }

    /// `from` sends a segment with `flags` and `len` bytes of data.
    fn send(&mut self, from: Side, flags: u8, len: u16) {
        let end = self.end(from);
        let seq = if flags & SYN != 0 {
            // A SYN-ACK answering a crossed SYN repeats the SYN's sequence number.
            end.snd_nxt.wrapping_sub(u32::from(end.syn_pending))
        } else {
            end.snd_nxt
        };
        let ack = if flags & ACK != 0 { end.rcv_nxt } else { 0 };
        let consumed = u32::from(len) + u32::from(flags & FIN != 0);
        end.snd_nxt = seq
            .wrapping_add(u32::from(flags & SYN != 0))
            .wrapping_add(consumed);
        if flags & SYN != 0 {
            end.syn_pending = true;
        }
        if flags & FIN != 0 {
            end.fin_sent = true;
            end.fin_seq = seq.wrapping_add(u32::from(len));
        }
        let segment = Segment {
            from,
            flags,
            seq,
            ack,
            payload_len: u32::from(len),
            receiver_ack: None,
        };
        end.in_flight.push_back(segment);
        if from == Side::Server {
            self.observe(segment);
        }
        if flags & RST != 0 {
            self.reset = true;
        }
    }

    /// The oldest segment in flight from `from` arrives.
    fn deliver(&mut self, from: Side) {
        let Some(segment) = self.end(from).in_flight.pop_front() else {
            return;
        };
        if from == Side::Client {
            self.observe(segment);
        }
        let to = from.peer();
        let flags = segment.flags;
        // After a reset, nothing more is answered.
        if self.reset {
            return;
        }
        let end = self.end(to);
        if flags & ACK != 0 && end.syn_pending && segment.ack == end.snd_nxt {
            end.syn_pending = false;
            end.open = true;
        }
        let answer = if flags & SYN != 0 {
            end.rcv_nxt = segment.seq.wrapping_add(1);
            if flags & ACK != 0 {
                end.open = true;
                Some(ACK)
            } else {
                // A listener, or an end whose own SYN crossed this one.
                Some(SYN | ACK)
            }
        } else {
            if end.open {
                end.rcv_nxt = segment
                    .seq
                    .wrapping_add(segment.payload_len)
                    .wrapping_add(u32::from(flags & FIN != 0));
            }
            // A FIN is acknowledged at once, as Linux does.
            (flags & FIN != 0).then_some(ACK)
        };
        if let Some(answer) = answer {
            self.send(to, answer, 0);
        }
    }

    /// A segment seen at the server's host: the flow starts, or both machines take it.
    fn observe(&mut self, segment: Segment) {
        self.now_ns += 1_000;
        self.seen.push(segment);
        let header = SegmentHeader {
            flags: segment.flags,
            seq: segment.seq,
            ack: segment.ack,
            payload_len: segment.payload_len as u16,
        };
        let direction = match segment.from {
            Side::Client => Direction::FromClient,
            Side::Server => Direction::FromServer,
        };
        let (Some(every), Some(reported)) = (&mut self.every, &mut self.reported) else {
            // The flow starts with the client's SYN (allow-listed) or with the ACK completing
            // a handshake (cookie, or the kernel's own).
            let opening = segment.from == Side::Client && segment.flags & (SYN | ACK) == SYN;
            let completing = segment.from == Side::Client && segment.flags & (SYN | ACK) == ACK;
            if self.from_syn && opening {
                self.every = Some(Connection::from_syn(&segment, self.now_ns));
                self.reported = Some(Connection::from_syn(&segment, self.now_ns));
                self.flow = Flow::opened_by(&header, self.now_ns);
            } else if !self.from_syn && completing {
                self.every = Some(Connection::from_cookie_ack(&segment, self.now_ns));
                self.reported = Some(Connection::from_cookie_ack(&segment, self.now_ns));
                self.flow = Flow::opened_by(&header, self.now_ns);
            }
            return;
        };
        every.on_segment(&segment, self.now_ns);
        if let Some(receiver_ack) = self.flow.observe(direction, &header) {
            let event = Segment {
                receiver_ack: Some(receiver_ack),
                ..segment
            };
            reported.on_segment(&event, self.now_ns);
        }
    }

    fn states(&self) -> Option<((TcpState, TcpState), (TcpState, TcpState))> {
        Some((
            self.every.as_ref()?.states(),
            self.reported.as_ref()?.states(),
        ))
    }

    /// Carries out `action` of `side`, if that end can.
    fn act(&mut self, side: Side, action: Action) {
        if self.reset {
            if let Action::Deliver = action {
                self.deliver(side);
            }
            return;
        }
        let end = self.end(side);
        let can_send = end.open && !end.fin_sent;
        match action {
            Action::Deliver => self.deliver(side),
            Action::Data(len) if can_send => self.send(side, ACK | PSH, len),
            Action::Fin if can_send => self.send(side, FIN | ACK, 0),
            Action::Ack if end.open => self.send(side, ACK, 0),
            Action::RetransmitFin if end.fin_sent => {
                let (fin_seq, rcv_nxt) = (end.fin_seq, end.rcv_nxt);
                let segment = Segment {
                    from: side,
                    flags: FIN | ACK,
                    seq: fin_seq,
                    ack: rcv_nxt,
                    payload_len: 0,
                    receiver_ack: None,
                };
                end.in_flight.push_back(segment);
                if side == Side::Server {
                    self.observe(segment);
                }
            }
            Action::Rst if end.open => self.send(side, RST | ACK, 0),
            _ => {}
        }
    }

    fn start(origin: Origin) -> Self {
        let mut talk = Self {
            client: End::new(CLIENT_ISN),
            server: End::new(SERVER_ISN),
            reset: false,
            from_syn: !matches!(origin, Origin::Handshake),
            every: None,
            reported: None,
            flow: Flow::default(),
            now_ns: 0,
            seen: Vec::new(),
        };
        match origin {
            Origin::Allowed => {
                talk.send(Side::Client, SYN, 0);
                talk.deliver(Side::Client);
            }
            Origin::SimultaneousOpen => {
                talk.send(Side::Client, SYN, 0);
                // The server's SYN leaves before the client's arrives: not yet tracked.
                talk.send(Side::Server, SYN, 0);
                talk.deliver(Side::Client);
                talk.deliver(Side::Server);
            }
            Origin::Handshake => {
                talk.send(Side::Client, SYN, 0);
                talk.deliver(Side::Client);
            }
        }
        // The handshake completes before either end has anything to send.
        talk.settle();
        talk
    }

    /// Everything in flight arrives, until nothing is.
    fn settle(&mut self) {
        while !self.client.in_flight.is_empty() || !self.server.in_flight.is_empty() {
            self.deliver(Side::Client);
            self.deliver(Side::Server);
        }
    }
}

fn any_origin() -> impl Strategy<Value = Origin> {
    prop_oneof![
        Just(Origin::Allowed),
        Just(Origin::SimultaneousOpen),
        Just(Origin::Handshake),
    ]
}

fn any_step() -> impl Strategy<Value = (Side, Action)> {
    let side = prop_oneof![Just(Side::Client), Just(Side::Server)];
    let action = prop_oneof![
        8 => Just(Action::Deliver),
        4 => (1u16..1500).prop_map(Action::Data),
        2 => Just(Action::Fin),
        2 => Just(Action::Ack),
        1 => Just(Action::RetransmitFin),
        1 => Just(Action::Rst),
    ];
    (side, action)
}

fn same_states(talk: &Conversation) -> Result<(), TestCaseError> {
    if let Some((every, reported)) = talk.states() {
        prop_assert_eq!(every, reported, "segments seen: {:#?}", talk.seen);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// After every segment seen at the server's host, the states reached from the reported
    /// segments alone are those reached from all of them.
    #[test]
    fn reported_segments_reach_the_states_every_segment_reaches(
        origin in any_origin(),
        steps in prop::collection::vec(any_step(), 0..60),
    ) {
        let mut talk = Conversation::start(origin);
        same_states(&talk)?;
        for (side, action) in steps {
            talk.act(side, action);
            same_states(&talk)?;
        }
        talk.settle();
        same_states(&talk)?;
        prop_assert!(talk.every.is_some(), "the flow was tracked");
    }
}

/// The lifecycles the property covers, each written out once, so that a change to the
/// conversation model that stopped producing one would show.
#[test]
fn the_model_reaches_every_lifecycle() {
    use Action::*;
    use Side::{Client, Server};
    use TcpState::*;
    let run = |origin, steps: &[(Side, Action)]| {
        let mut talk = Conversation::start(origin);
        for &(side, action) in steps {
            talk.act(side, action);
        }
        talk.settle();
        let (every, reported) = talk.states().expect("tracked");
        assert_eq!(every, reported, "{:#?}", talk.seen);
        every
    };
    for origin in [Origin::Allowed, Origin::Handshake, Origin::SimultaneousOpen] {
        // Client closes first; the server's FIN follows.
        let client_close = [
            (Client, Fin),
            (Client, Deliver),
            (Server, Deliver),
            (Server, Fin),
        ];
        assert_eq!(run(origin, &client_close), (TimeWait, Closed), "{origin:?}");
        // The client's FIN sent twice, the second copy arriving after the server's FIN.
        let retransmitted = [
            (Client, Fin),
            (Client, Deliver),
            (Server, Fin),
            (Client, RetransmitFin),
        ];
        assert_eq!(
            run(origin, &retransmitted),
            (TimeWait, Closed),
            "{origin:?}"
        );
        let server_close = [
            (Server, Fin),
            (Server, Deliver),
            (Client, Deliver),
            (Client, Fin),
        ];
        assert_eq!(run(origin, &server_close), (Closed, TimeWait), "{origin:?}");
        // Both FINs leave before either arrives.
        let simultaneous = [(Client, Fin), (Server, Fin)];
        assert_eq!(
            run(origin, &simultaneous),
            (TimeWait, TimeWait),
            "{origin:?}"
        );
        let half_close = [
            (Client, Fin),
            (Client, Deliver),
            (Server, Data(1000)),
            (Server, Data(1000)),
            (Server, Fin),
        ];
        assert_eq!(run(origin, &half_close), (TimeWait, Closed), "{origin:?}");
        for side in [Client, Server] {
            let reset = [
                (side, Data(10)),
                (side, Deliver),
                (side.peer(), Ack),
                (side.peer(), Deliver),
                (side, Rst),
            ];
            assert_eq!(
                run(origin, &reset),
                (Closed, Closed),
                "{origin:?} {side:?} resets"
            );
        }
    }
}
