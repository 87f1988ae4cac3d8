//! The connection state machine driven through the lifecycles of RFC 9293, segment by segment,
//! as the data plane would report them, and through random segment sequences.

use std::time::Duration;

use TcpState::*;
use proptest::prelude::*;
use tcpguard::{
    connection::{CloseReason, Connection, Segment, Side, Timeouts},
    tcp_state::{SegmentKind, TcpState},
};
use tcpguard_common::tcp_flags::{ACK, FIN, PSH, RST, SYN};

const CLIENT_ISN: u32 = 1000;
const SERVER_ISN: u32 = 5000;
const SECOND: u64 = 1_000_000_000;

/// A conversation between the two ends that keeps both sequence spaces as a real one would.
struct Conversation {
    connection: Connection,
    client_next: u32,
    server_next: u32,
    now_ns: u64,
}

impl Conversation {
    /// Client and server once the client's SYN has been seen (an allow-listed source).
    fn handshake_started() -> Self {
        let syn = Segment {
            from: Side::Client,
            flags: SYN,
            seq: CLIENT_ISN,
            ack: 0,
            payload_len: 0,
            receiver_ack: None,
        };
        let connection = Connection::from_syn(&syn, 0);
        assert_eq!(connection.states(), (SynSent, SynReceived));
        Self {
            connection,
            client_next: CLIENT_ISN + 1,
            server_next: SERVER_ISN,
            now_ns: 0,
        }
    }

    /// Client and server after a cookie handshake: only the final ACK was seen.
    fn from_cookie() -> Self {
        let ack = Segment {
            from: Side::Client,
            flags: ACK,
            seq: CLIENT_ISN + 1,
            ack: SERVER_ISN + 1,
            payload_len: 0,
            receiver_ack: Some(CLIENT_ISN + 1),
        };
        Self {
            connection: Connection::from_cookie_ack(&ack, 0),
            client_next: CLIENT_ISN + 1,
            server_next: SERVER_ISN + 1,
            now_ns: 0,
        }
    }

    fn states(&self) -> (TcpState, TcpState) {
        self.connection.states()
    }

    /// `from` sends a segment with `flags` and `len` bytes of data, acknowledging everything
    /// it has received; returns how the machine judged it.
    fn send(&mut self, from: Side, flags: u8, len: u32) -> SegmentKind {
        let (seq, ack) = match from {
            Side::Client => (self.client_next, self.server_next),
            Side::Server => (self.server_next, self.client_next),
        };
        let consumed = len + u32::from(flags & (SYN | FIN) != 0);
        match from {
            Side::Client => self.client_next += consumed,
            Side::Server => self.server_next += consumed,
        }
        self.deliver(Segment {
            from,
            flags,
            seq,
            ack,
            payload_len: len,
            receiver_ack: None,
        })
    }

    fn deliver(&mut self, segment: Segment) -> SegmentKind {
        self.now_ns += SECOND / 1000;
        self.connection
            .on_segment(&segment, self.now_ns)
            .expect("a segment to an open connection")
    }

    fn wait(&mut self, duration: Duration) {
        self.now_ns += duration.as_nanos() as u64;
        self.connection.on_time(self.now_ns, &Timeouts::default());
    }

    fn closed(&self) -> Option<CloseReason> {
        self.connection.closed
    }
}

use Side::{Client, Server};

#[test]
fn handshake_through_a_cookie_starts_established() {
    let talk = Conversation::from_cookie();
    assert_eq!(talk.states(), (Established, Established));
    assert_eq!(talk.connection.established_ns, Some(0));
}

/// The handshake's pure ACK was lost and the client's FIN completed it: the kernel builds the
/// socket from the FIN and takes the FIN at once, and so does the machine.
#[test]
fn handshake_through_a_cookie_completed_by_a_fin() {
    let fin = Segment {
        from: Side::Client,
        flags: FIN | ACK,
        seq: CLIENT_ISN + 1,
        ack: SERVER_ISN + 1,
        payload_len: 0,
        receiver_ack: Some(CLIENT_ISN + 1),
    };
    let mut talk = Conversation {
        connection: Connection::from_cookie_ack(&fin, 0),
        client_next: CLIENT_ISN + 2,
        server_next: SERVER_ISN + 1,
        now_ns: 0,
    };
    assert_eq!(talk.states(), (FinWait1, CloseWait));
    assert_eq!(talk.connection.established_ns, Some(0));
    assert_eq!(talk.send(Server, ACK, 0), SegmentKind::Acks);
    assert_eq!(talk.states(), (FinWait2, CloseWait));
    talk.send(Server, FIN | ACK, 0);
    talk.send(Client, ACK, 0);
    assert_eq!(talk.states(), (TimeWait, Closed));
}

#[test]
fn three_way_handshake() {
    let mut talk = Conversation::handshake_started();
    talk.send(Server, SYN | ACK, 0);
    assert_eq!(talk.states(), (Established, SynReceived));
    assert_eq!(talk.send(Client, ACK, 0), SegmentKind::Acks);
    assert_eq!(talk.states(), (Established, Established));
    assert!(talk.connection.established_ns.is_some());
}

#[test]
fn client_closes_first() {
    let mut talk = Conversation::from_cookie();
    talk.send(Client, ACK | PSH, 100);
    talk.send(Server, ACK | PSH, 1000);
    assert_eq!(talk.send(Client, FIN | ACK, 0), SegmentKind::Fin);
    assert_eq!(talk.states(), (FinWait1, CloseWait));
    assert_eq!(talk.send(Server, ACK, 0), SegmentKind::Acks);
    assert_eq!(talk.states(), (FinWait2, CloseWait));
    talk.send(Server, FIN | ACK, 0);
    assert_eq!(talk.states(), (TimeWait, LastAck));
    talk.send(Client, ACK, 0);
    assert_eq!(talk.states(), (TimeWait, Closed));
    assert_eq!(
        talk.closed(),
        None,
        "TIME-WAIT is still part of the connection"
    );
    talk.wait(Duration::from_secs(59));
    assert_eq!(
        talk.states(),
        (TimeWait, Closed),
        "2·MSL is 60 s by default"
    );
    talk.wait(Duration::from_secs(2));
    assert_eq!(talk.states(), (Closed, Closed));
    assert_eq!(talk.closed(), Some(CloseReason::Fin));
}

#[test]
fn server_closes_first_and_the_client_answers_with_fin_ack() {
    let mut talk = Conversation::from_cookie();
    talk.send(Server, FIN | ACK, 0);
    assert_eq!(talk.states(), (CloseWait, FinWait1));
    // The client's ACK of the FIN carries its own FIN: FIN-WAIT-1 straight to TIME-WAIT.
    assert_eq!(talk.send(Client, FIN | ACK, 0), SegmentKind::FinAcks);
    assert_eq!(talk.states(), (LastAck, TimeWait));
    talk.send(Server, ACK, 0);
    assert_eq!(talk.states(), (Closed, TimeWait));
    talk.wait(Duration::from_secs(61));
    assert_eq!(talk.closed(), Some(CloseReason::Fin));
}

#[test]
fn simultaneous_close_goes_through_closing() {
    let mut talk = Conversation::from_cookie();
    // Both FINs are sent before either is received: neither acknowledges the other.
    let client_fin = Segment {
        from: Client,
        flags: FIN | ACK,
        seq: talk.client_next,
        ack: talk.server_next,
        payload_len: 0,
        receiver_ack: None,
    };
    let server_fin = Segment {
        from: Server,
        flags: FIN | ACK,
        seq: talk.server_next,
        ack: talk.client_next,
        payload_len: 0,
        receiver_ack: None,
    };
    talk.client_next += 1;
    talk.server_next += 1;
    // Seen at the server: its own FIN leaves, then the client's arrives, acknowledging
    // nothing of the server's. The server goes FIN-WAIT-1 → CLOSING.
    assert_eq!(talk.deliver(server_fin), SegmentKind::Fin);
    assert_eq!(talk.states().1, FinWait1);
    assert_eq!(talk.deliver(client_fin), SegmentKind::Fin);
    assert_eq!(talk.states().1, Closing);
    // The client's FIN did not acknowledge the server's: it was sent before that arrived, so
    // the client too went FIN-WAIT-1 → CLOSING.
    assert_eq!(talk.states(), (Closing, Closing));
    // Each end acknowledges the other's FIN, which takes it to TIME-WAIT: both ends, as the
    // kernel's sockets show after a simultaneous close.
    assert_eq!(talk.send(Client, ACK, 0), SegmentKind::Acks);
    assert_eq!(talk.states().1, TimeWait);
    talk.send(Server, ACK, 0);
    assert_eq!(talk.states(), (TimeWait, TimeWait));
    talk.wait(Duration::from_secs(61));
    assert_eq!(talk.closed(), Some(CloseReason::Fin));
}

#[test]
fn half_closed_connection_keeps_sending_data() {
    let mut talk = Conversation::from_cookie();
    talk.send(Client, FIN | ACK, 0);
    talk.send(Server, ACK, 0);
    assert_eq!(talk.states(), (FinWait2, CloseWait));
    for _ in 0..50 {
        assert_eq!(talk.send(Server, ACK | PSH, 1400), SegmentKind::Ack);
        assert_eq!(talk.send(Client, ACK, 0), SegmentKind::Ack);
    }
    assert_eq!(talk.states(), (FinWait2, CloseWait));
    talk.send(Server, FIN | ACK, 10);
    talk.send(Client, ACK, 0);
    assert_eq!(talk.states(), (TimeWait, Closed));
}

#[test]
fn exact_rst_from_the_client_aborts() {
    let mut talk = Conversation::from_cookie();
    talk.send(Server, ACK | PSH, 500);
    talk.send(Client, ACK, 0);
    assert_eq!(talk.send(Client, RST, 0), SegmentKind::Rst);
    assert_eq!(talk.closed(), Some(CloseReason::Rst));
}

/// Once over, a connection judges no segment (no made-up kind) and nothing about it changes.
#[test]
fn a_closed_connection_judges_nothing() {
    let mut talk = Conversation::from_cookie();
    talk.send(Client, RST, 0);
    let closed = talk.connection.clone();
    for flags in [SYN, SYN | ACK, ACK, FIN | ACK, RST] {
        let segment = Segment {
            from: Server,
            flags,
            seq: SERVER_ISN + 1,
            ack: CLIENT_ISN + 1,
            payload_len: 0,
            receiver_ack: None,
        };
        assert_eq!(talk.connection.on_segment(&segment, SECOND), None);
        assert_eq!(talk.connection, closed);
    }
}

#[test]
fn exact_rst_from_the_server_aborts() {
    let mut talk = Conversation::from_cookie();
    talk.send(Client, ACK | PSH, 500);
    talk.send(Server, ACK, 0);
    assert_eq!(talk.send(Server, RST | ACK, 0), SegmentKind::Rst);
    assert_eq!(talk.states(), (Closed, Closed));
    assert_eq!(talk.closed(), Some(CloseReason::Rst));
}

#[test]
fn inexact_rst_is_ignored_rfc5961() {
    let mut talk = Conversation::from_cookie();
    for offset in [1u32, 100, 65_535, 1 << 31] {
        let blind = Segment {
            from: Client,
            flags: RST,
            seq: talk.client_next.wrapping_add(offset),
            ack: 0,
            payload_len: 0,
            receiver_ack: None,
        };
        assert_eq!(
            talk.deliver(blind),
            SegmentKind::IgnoredRst,
            "offset {offset}"
        );
        assert_eq!(talk.states(), (Established, Established));
    }
    // The data plane's fresher view of what the server acknowledged decides.
    let fresh = Segment {
        from: Client,
        flags: RST,
        seq: talk.client_next + 700,
        ack: 0,
        payload_len: 0,
        receiver_ack: Some(talk.client_next + 700),
    };
    assert_eq!(talk.deliver(fresh), SegmentKind::Rst);
    assert_eq!(talk.closed(), Some(CloseReason::Rst));
}

#[test]
fn rst_answering_a_syn_must_acknowledge_it() {
    let mut talk = Conversation::handshake_started();
    // Seen from the client in SYN-SENT, the server answering with a reset.
    talk.connection = Connection::with_states(SynSent, Listen, 0);
    talk.send(Client, SYN, 0);
    let wrong = Segment {
        from: Server,
        flags: RST | ACK,
        seq: 0,
        ack: talk.client_next + 6,
        payload_len: 0,
        receiver_ack: None,
    };
    assert_eq!(talk.deliver(wrong), SegmentKind::IgnoredRst);
    assert_eq!(
        talk.deliver(Segment {
            flags: RST,
            ..wrong
        }),
        SegmentKind::IgnoredRst
    );
    let right = Segment {
        ack: talk.client_next,
        ..wrong
    };
    assert_eq!(talk.deliver(right), SegmentKind::Rst);
    assert_eq!(talk.states().0, Closed);
}

#[test]
fn simultaneous_open() {
    let mut talk = Conversation::handshake_started();
    talk.connection = Connection::with_states(SynSent, SynSent, 0);
    // The two SYNs cross: each end receives a SYN in SYN-SENT and goes to SYN-RECEIVED.
    talk.client_next = CLIENT_ISN;
    talk.send(Client, SYN, 0);
    talk.send(Server, SYN, 0);
    assert_eq!(talk.states(), (SynReceived, SynReceived));
    // Each answers with SYN-ACK (the same SYN, now acknowledging the other's), and each
    // SYN-ACK acknowledges the receiver's SYN.
    talk.client_next -= 1;
    talk.server_next -= 1;
    talk.send(Client, SYN | ACK, 0);
    talk.send(Server, SYN | ACK, 0);
    assert_eq!(talk.states(), (Established, Established));
}

#[test]
fn rst_in_time_wait_ends_it_early() {
    let mut talk = Conversation::from_cookie();
    talk.send(Client, FIN | ACK, 0);
    talk.send(Server, FIN | ACK, 0);
    talk.send(Client, ACK, 0);
    assert_eq!(talk.states(), (TimeWait, Closed));
    talk.send(Server, RST, 0);
    assert_eq!(talk.states(), (Closed, Closed));
}

#[test]
fn retransmitted_fin_restarts_time_wait() {
    let mut talk = Conversation::from_cookie();
    talk.send(Client, FIN | ACK, 0);
    talk.send(Server, FIN | ACK, 0);
    talk.send(Client, ACK, 0);
    talk.wait(Duration::from_secs(50));
    // The final ACK was lost: the server sends its FIN again.
    talk.server_next -= 1;
    talk.send(Server, FIN | ACK, 0);
    talk.wait(Duration::from_secs(50));
    assert_eq!(talk.states(), (TimeWait, Closed));
    talk.wait(Duration::from_secs(11));
    assert_eq!(talk.closed(), Some(CloseReason::Fin));
}

#[test]
fn idle_established_connection_lives_until_the_keepalive_horizon() {
    let mut talk = Conversation::from_cookie();
    talk.wait(Duration::from_secs(2 * 3600));
    assert_eq!(talk.states(), (Established, Established));
    talk.wait(Duration::from_secs(10 * 75));
    assert_eq!(talk.closed(), Some(CloseReason::Timeout));
}

#[test]
fn traffic_the_data_plane_saw_keeps_a_connection_alive() {
    let mut talk = Conversation::from_cookie();
    let timeouts = Timeouts::default();
    let horizon = timeouts.established.as_nanos() as u64;
    talk.connection.touch(horizon - SECOND);
    talk.connection.on_time(horizon + SECOND, &timeouts);
    assert_eq!(talk.closed(), None);
}

#[test]
fn half_open_handshake_times_out() {
    let mut talk = Conversation::handshake_started();
    talk.wait(Duration::from_secs(121));
    assert_eq!(talk.closed(), Some(CloseReason::Timeout));
}

fn any_segment() -> impl Strategy<Value = Segment> {
    let flags = prop::sample::select(vec![
        SYN,
        SYN | ACK,
        ACK,
        ACK | PSH,
        FIN | ACK,
        RST,
        RST | ACK,
        0,
        0xff,
    ]);
    let near = prop_oneof![Just(CLIENT_ISN + 1), Just(SERVER_ISN + 1), any::<u32>()];
    (
        any::<bool>(),
        flags,
        near.clone(),
        near,
        0u32..2000,
        prop::option::of(any::<u32>()),
    )
        .prop_map(
            |(client, flags, seq, ack, payload_len, receiver_ack)| Segment {
                from: if client { Side::Client } else { Side::Server },
                flags,
                seq,
                ack,
                payload_len,
                receiver_ack,
            },
        )
}

fn any_state() -> impl Strategy<Value = TcpState> {
    prop::sample::select(TcpState::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any sequence of segments, from any pair of states, at any pace: no panic, and once every
    /// timeout has passed the connection is over.
    #[test]
    fn any_segments_then_silence_end_closed(
        client in any_state(),
        server in any_state(),
        segments in prop::collection::vec((any_segment(), 0u64..300 * SECOND), 0..40),
    ) {
        let timeouts = Timeouts::default();
        let mut connection = Connection::with_states(client, server, 0);
        let mut now = 0;
        for (segment, gap) in &segments {
            now += gap;
            connection.on_time(now, &timeouts);
            connection.on_segment(segment, now);
        }
        now += timeouts.longest().as_nanos() as u64 + 1;
        connection.on_time(now, &timeouts);
        prop_assert_eq!(connection.states(), (Closed, Closed));
        prop_assert!(connection.closed.is_some());
        prop_assert!(connection.deadline_ns(&timeouts).is_none());
    }

    /// Only an acceptable RST can end a connection by reset.
    #[test]
    fn ignored_rsts_change_nothing(
        client in any_state(),
        server in any_state(),
        segment in any_segment(),
    ) {
        let mut connection = Connection::with_states(client, server, 0);
        let before = connection.states();
        if connection.on_segment(&segment, 1) == Some(SegmentKind::IgnoredRst) {
            prop_assert_eq!(connection.states(), before);
            prop_assert_ne!(connection.closed, Some(CloseReason::Rst));
        }
    }
}
