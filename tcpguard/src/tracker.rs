//! Every tracked connection, keyed by its 4-tuple: lifecycle events in, state changes and
//! their consequences out (a flow to forget, a source at its limit, a connection opened or
//! closed). No I/O: the daemon carries out the effects.

use std::collections::HashMap;

use serde::Serialize;
use tcpguard_common::{
    Direction, EventKind, FLOW_IPV4, FlowKey, LifecycleEvent, SourceKey, UnknownValue,
    tcp_flags::{ACK, RST, SYN},
};

use crate::{
    connection::{CloseReason, Connection, Segment, Side, Timeouts},
    tcp_state::TcpState,
};

/// How tcpguard came to track a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Its handshake completed through a SYN cookie answered from XDP.
    Cookie,
    /// Its SYN came from an allow-listed source and went straight to the kernel.
    Allowed,
    /// It was already in the flow map, or first seen mid-life.
    Adopted,
    /// Its SYN came outside an attack and the kernel answered it; tracked from the ACK that
    /// completed the handshake.
    Kernel,
}

impl Origin {
    pub const ALL: [Self; 4] = [Self::Cookie, Self::Allowed, Self::Adopted, Self::Kernel];

    pub const fn label(self) -> &'static str {
        match self {
            Self::Cookie => "cookie",
            Self::Allowed => "allowed",
            Self::Adopted => "adopted",
            Self::Kernel => "kernel",
        }
    }
}

/// What the daemon must do, or record, because of an event or the passing of time.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    Opened {
        origin: Origin,
    },
    /// Both ends reached ESTABLISHED, `seconds` after the client's SYN was first seen.
    Handshake {
        seconds: f64,
    },
    /// The server's end is CLOSED while the client's lingers (TIME-WAIT after a client
    /// close): the data plane stops tracking the flow, so that late segments for it meet the
    /// kernel's socket table (no socket: the cookie check drops them) instead of passing to a
    /// kernel that would answer them with RSTs.
    Untracked {
        key: FlowKey,
    },
    /// The connection is over.
    Closed {
        key: FlowKey,
        reason: CloseReason,
        seconds: f64,
        /// Its flow entry in the data plane can go; not when a new connection on the same
        /// 4-tuple already holds it.
        forget: bool,
    },
    /// `source` reached (true) or fell below (false) its connection limit.
    SourceFull {
        source: SourceKey,
        full: bool,
    },
}

/// One tracked connection.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub connection: Connection,
    pub origin: Origin,
    /// When the client's SYN was seen, if it was: the start of the handshake.
    syn_ns: Option<u64>,
    /// The data plane no longer tracks it (see [`Effect::Untracked`]).
    untracked: bool,
}

/// Connections in each family's flow map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InFlowMaps {
    pub ipv4: usize,
    pub ipv6: usize,
}

/// The connection table.
pub struct Tracker {
    connections: HashMap<FlowKey, Tracked>,
    per_source: HashMap<SourceKey, u32>,
    /// Connections a source may have; 0: no limit.
    limit: u32,
    timeouts: Timeouts,
}

impl Tracker {
    pub fn new(timeouts: Timeouts, limit: u32) -> Self {
        Self {
            connections: HashMap::new(),
            per_source: HashMap::new(),
            limit,
            timeouts,
        }
    }

    /// New timeouts and limit (a reload). Sources newly over or under the limit are reported.
    pub fn reconfigure(&mut self, timeouts: Timeouts, limit: u32, effects: &mut Vec<Effect>) {
        self.timeouts = timeouts;
        if limit == self.limit {
            return;
        }
        let old = self.limit;
        self.limit = limit;
        for (source, &count) in &self.per_source {
            let was = old != 0 && count >= old;
            let is = limit != 0 && count >= limit;
            if was != is {
                effects.push(Effect::SourceFull {
                    source: *source,
                    full: is,
                });
            }
        }
    }

    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    pub fn get(&self, key: &FlowKey) -> Option<&Tracked> {
        self.connections.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&FlowKey, &Tracked)> {
        self.connections.iter()
    }

    /// Connections whose flow the data plane still tracks, IPv4 and IPv6 (each family has a
    /// flow map of its own): all but those whose entry was removed from the flow map before
    /// they left this table ([`Effect::Untracked`]).
    pub fn in_flow_maps(&self) -> InFlowMaps {
        let mut counts = InFlowMaps::default();
        for (key, tracked) in &self.connections {
            match (tracked.untracked, key.family) {
                (true, _) => {}
                (false, FLOW_IPV4) => counts.ipv4 += 1,
                (false, _) => counts.ipv6 += 1,
            }
        }
        counts
    }

    /// How many connections have each (client state, server state) pair.
    pub fn count_by_state(&self) -> HashMap<(TcpState, TcpState), usize> {
        let mut counts = HashMap::new();
        for tracked in self.connections.values() {
            *counts.entry(tracked.connection.states()).or_default() += 1;
        }
        counts
    }

    /// A flow found in the data plane's map that this table does not know (a restart).
    pub fn adopt(&mut self, key: FlowKey, last_seen_ns: u64, effects: &mut Vec<Effect>) {
        if !self.connections.contains_key(&key) {
            let connection = Connection::adopted(last_seen_ns);
            self.insert(key, connection, Origin::Adopted, None, effects);
        }
    }

    /// Applies one lifecycle event; one whose kind or direction is unknown changes nothing.
    pub fn on_event(
        &mut self,
        event: &LifecycleEvent,
        effects: &mut Vec<Effect>,
    ) -> Result<(), UnknownValue> {
        let kind = event.kind()?;
        let segment = segment_of(event)?;
        let now = event.time_ns;
        match kind {
            EventKind::CookieHandshake | EventKind::KernelHandshake => {
                // A 4-tuple reused after TIME-WAIT: the old connection is over.
                self.finish(&event.key, now, effects);
                let connection = Connection::from_cookie_ack(&segment, now);
                let syn_ns = (event.syn_time_ns != 0).then_some(event.syn_time_ns);
                let origin = if kind == EventKind::KernelHandshake {
                    Origin::Kernel
                } else {
                    Origin::Cookie
                };
                self.insert(event.key, connection, origin, syn_ns, effects);
                if let Some(syn_ns) = syn_ns {
                    effects.push(Effect::Handshake {
                        seconds: seconds(now.saturating_sub(syn_ns)),
                    });
                }
            }
            EventKind::AllowedSyn => {
                self.finish(&event.key, now, effects);
                let connection = Connection::from_syn(&segment, now);
                self.insert(event.key, connection, Origin::Allowed, Some(now), effects);
            }
            EventKind::Segment => {
                if let Some(origin) = self.reopened_by(&event.key, &segment) {
                    // The old connection's flow entry carries the new one: the data plane
                    // knows no more than a tracked 4-tuple.
                    self.finish(&event.key, now, effects);
                    let connection = Connection::reopened_by(&segment, now);
                    let syn_ns = (origin == Origin::Allowed).then_some(now);
                    self.insert(event.key, connection, origin, syn_ns, effects);
                    return Ok(());
                }
                if !self.connections.contains_key(&event.key) {
                    self.adopt(event.key, now, effects);
                }
                let Some(tracked) = self.connections.get_mut(&event.key) else {
                    return Ok(());
                };
                let was_established = tracked.connection.established_ns.is_some();
                tracked.connection.on_segment(&segment, now);
                if !was_established
                    && let (Some(established), Some(syn)) =
                        (tracked.connection.established_ns, tracked.syn_ns)
                {
                    effects.push(Effect::Handshake {
                        seconds: seconds(established.saturating_sub(syn)),
                    });
                }
                if tracked.connection.closed.is_some() {
                    self.remove(&event.key, true, effects);
                } else if tracked.connection.server.state == TcpState::Closed && !tracked.untracked
                {
                    tracked.untracked = true;
                    effects.push(Effect::Untracked { key: event.key });
                }
            }
        }
        Ok(())
    }

    /// Marks the connection `key` as no longer in the flow map, whose entry the daemon removed
    /// (a client the deny list now denies); it stays in this table until it ends.
    pub fn untrack(&mut self, key: &FlowKey) {
        if let Some(tracked) = self.connections.get_mut(key) {
            tracked.untracked = true;
        }
    }

    /// Applies the passing of time up to `now_ns`. `last_seen` gives the data plane's last
    /// sighting of a flow (plain data refreshes it without an event); a connection whose
    /// deadline has passed is only reaped if that is no later than what this table knows.
    pub fn expire(
        &mut self,
        now_ns: u64,
        mut last_seen: impl FnMut(&FlowKey) -> Option<u64>,
        effects: &mut Vec<Effect>,
    ) {
        let due: Vec<FlowKey> = self
            .connections
            .iter()
            .filter(|(_, tracked)| {
                tracked
                    .connection
                    .deadline_ns(&self.timeouts)
                    .is_some_and(|deadline| deadline <= now_ns)
            })
            .map(|(key, _)| *key)
            .collect();
        for key in due {
            let Some(tracked) = self.connections.get_mut(&key) else {
                continue;
            };
            if let Some(seen) = last_seen(&key) {
                tracked.connection.touch(seen);
            }
            tracked.connection.on_time(now_ns, &self.timeouts);
            if tracked.connection.closed.is_some() {
                self.remove(&key, true, effects);
            }
        }
    }

    fn longest_ns(&self) -> u64 {
        u64::try_from(self.timeouts.longest().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Ends the connection `key`, if there is one, as the passing of time would, because a
    /// new connection on its 4-tuple began at `now_ns`; the data plane's flow entry, which is
    /// the new connection's now, stays.
    fn finish(&mut self, key: &FlowKey, now_ns: u64, effects: &mut Vec<Effect>) {
        let at_ns = now_ns.saturating_add(self.longest_ns());
        if let Some(tracked) = self.connections.get_mut(key) {
            tracked.connection.on_time(at_ns, &self.timeouts);
            self.remove(key, false, effects);
        }
    }

    /// Whether `segment` opens a new connection on the 4-tuple `key`, whose tracked connection
    /// is over at both ends (CLOSED or TIME-WAIT, which Linux lets a new SYN end): an
    /// allow-listed client's SYN, or the SYN-ACK the kernel answers a SYN with (the SYN itself,
    /// met by the kernel's TIME-WAIT socket, is not reported). Returns the new one's origin.
    fn reopened_by(&self, key: &FlowKey, segment: &Segment) -> Option<Origin> {
        let tracked = self.connections.get(key)?;
        let over = |state| matches!(state, TcpState::Closed | TcpState::TimeWait);
        let (client, server) = tracked.connection.states();
        if !(over(client) && over(server)) {
            return None;
        }
        match (segment.from, segment.flags & (SYN | ACK | RST)) {
            (Side::Client, SYN) => Some(Origin::Allowed),
            (Side::Server, flags) if flags == SYN | ACK => Some(Origin::Kernel),
            _ => None,
        }
    }

    fn insert(
        &mut self,
        key: FlowKey,
        connection: Connection,
        origin: Origin,
        syn_ns: Option<u64>,
        effects: &mut Vec<Effect>,
    ) {
        let replaced = self.connections.insert(
            key,
            Tracked {
                connection,
                origin,
                syn_ns,
                untracked: false,
            },
        );
        effects.push(Effect::Opened { origin });
        let source = key.source();
        let count = self.per_source.entry(source).or_default();
        // A new connection on the 4-tuple of one the data plane has forgotten (its TIME-WAIT
        // over): the source has as many connections as before.
        if replaced.is_none() {
            *count += 1;
        }
        if self.limit != 0 && *count == self.limit {
            effects.push(Effect::SourceFull { source, full: true });
        }
    }

    fn remove(&mut self, key: &FlowKey, forget: bool, effects: &mut Vec<Effect>) {
        let Some(tracked) = self.connections.remove(key) else {
            return;
        };
        let connection = &tracked.connection;
        let ended = connection.last_activity_ns.max(connection.opened_ns);
        effects.push(Effect::Closed {
            key: *key,
            reason: connection.closed.unwrap_or(CloseReason::Timeout),
            seconds: seconds(ended.saturating_sub(connection.opened_ns)),
            forget,
        });
        let source = key.source();
        if let Some(count) = self.per_source.get_mut(&source) {
            if self.limit != 0 && *count == self.limit {
                effects.push(Effect::SourceFull {
                    source,
                    full: false,
                });
            }
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&source);
            }
        }
    }
}

fn segment_of(event: &LifecycleEvent) -> Result<Segment, UnknownValue> {
    let from = match event.direction()? {
        Direction::FromClient => Side::Client,
        Direction::FromServer => Side::Server,
    };
    Ok(Segment {
        from,
        flags: event.flags,
        seq: event.seq,
        ack: event.ack,
        payload_len: u32::from(event.payload_len),
        receiver_ack: Some(event.receiver_ack),
    })
}

fn seconds(nanoseconds: u64) -> f64 {
    nanoseconds as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use tcpguard_common::{FLOW_IPV4, tcp_flags};

    use super::*;

    fn key(client: u8, port: u16) -> FlowKey {
        let mut key = FlowKey {
            family: FLOW_IPV4,
            client_port: port,
            server_port: 80,
            ..FlowKey::default()
        };
        key.client_addr[..4].copy_from_slice(&[10, 0, 0, client]);
        key.server_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        key
    }

    fn cookie_ack(key: FlowKey, time_ns: u64) -> LifecycleEvent {
        LifecycleEvent {
            key,
            time_ns,
            syn_time_ns: time_ns - 2_000_000,
            seq: 101,
            ack: 501,
            receiver_ack: 101,
            flags: tcp_flags::ACK,
            kind: EventKind::CookieHandshake as u8,
            direction: Direction::FromClient as u8,
            ..LifecycleEvent::default()
        }
    }

    #[test]
    fn a_source_at_its_limit_is_reported_full_until_one_closes() {
        let mut tracker = Tracker::new(Timeouts::default(), 2);
        let mut effects = Vec::new();
        tracker
            .on_event(&cookie_ack(key(2, 1000), 10_000_000), &mut effects)
            .unwrap();
        assert!(
            !effects
                .iter()
                .any(|e| matches!(e, Effect::SourceFull { .. }))
        );
        tracker
            .on_event(&cookie_ack(key(2, 1001), 10_000_000), &mut effects)
            .unwrap();
        let source = key(2, 0).source();
        assert!(effects.contains(&Effect::SourceFull { source, full: true }));
        assert!(effects.contains(&Effect::Handshake { seconds: 0.002 }));
        effects.clear();
        let rst = LifecycleEvent {
            kind: EventKind::Segment as u8,
            flags: tcp_flags::RST | tcp_flags::ACK,
            direction: Direction::FromServer as u8,
            seq: 501,
            receiver_ack: 501,
            time_ns: 20_000_000,
            ..cookie_ack(key(2, 1000), 20_000_000)
        };
        tracker.on_event(&rst, &mut effects).unwrap();
        assert!(effects.contains(&Effect::SourceFull {
            source,
            full: false
        }));
        assert!(matches!(
            effects[0],
            Effect::Closed {
                reason: CloseReason::Rst,
                ..
            }
        ));
        assert_eq!(tracker.len(), 1);
    }

    #[test]
    fn an_untracked_connection_stays_in_the_table_and_leaves_the_flow_map_count() {
        let mut tracker = Tracker::new(Timeouts::default(), 0);
        let mut effects = Vec::new();
        for port in [1000, 1001] {
            tracker
                .on_event(&cookie_ack(key(5, port), 10_000_000), &mut effects)
                .unwrap();
        }
        assert_eq!(tracker.in_flow_maps(), InFlowMaps { ipv4: 2, ipv6: 0 });
        tracker.untrack(&key(5, 1000));
        assert_eq!(tracker.len(), 2);
        assert_eq!(tracker.in_flow_maps(), InFlowMaps { ipv4: 1, ipv6: 0 });
    }

    #[test]
    fn a_client_close_leaves_the_data_plane_once_the_server_end_is_closed() {
        let mut tracker = Tracker::new(Timeouts::default(), 0);
        let mut effects = Vec::new();
        let key = key(4, 1000);
        tracker
            .on_event(&cookie_ack(key, 10_000_000), &mut effects)
            .unwrap();
        let segment = |direction, flags, seq, ack, time_ns| LifecycleEvent {
            kind: EventKind::Segment as u8,
            direction: direction as u8,
            flags,
            seq,
            ack,
            receiver_ack: ack,
            time_ns,
            ..cookie_ack(key, time_ns)
        };
        use tcp_flags::{ACK, FIN};
        tracker
            .on_event(
                &segment(Direction::FromClient, FIN | ACK, 101, 501, 20_000_000),
                &mut effects,
            )
            .unwrap();
        tracker
            .on_event(
                &segment(Direction::FromServer, FIN | ACK, 501, 102, 21_000_000),
                &mut effects,
            )
            .unwrap();
        effects.clear();
        tracker
            .on_event(
                &segment(Direction::FromClient, ACK, 102, 502, 22_000_000),
                &mut effects,
            )
            .unwrap();
        assert_eq!(effects, vec![Effect::Untracked { key }]);
        let tracked = tracker.get(&key).expect("still listed while in TIME-WAIT");
        assert_eq!(
            tracked.connection.states(),
            (TcpState::TimeWait, TcpState::Closed)
        );
    }

    /// The client reconnects from the same port while the server's end of the old connection
    /// is in TIME-WAIT: the kernel answers the SYN, and the SYN-ACK opens the new connection
    /// without taking its flow entry from the data plane.
    #[test]
    fn a_syn_ack_on_a_4_tuple_over_at_both_ends_opens_a_new_connection() {
        use tcp_flags::{ACK, FIN, SYN};
        let mut tracker = Tracker::new(Timeouts::default(), 0);
        let mut effects = Vec::new();
        let key = key(6, 1000);
        tracker
            .on_event(&cookie_ack(key, 10_000_000), &mut effects)
            .unwrap();
        let segment = |direction: Direction, flags, seq, ack, time_ns| LifecycleEvent {
            kind: EventKind::Segment as u8,
            direction: direction as u8,
            flags,
            seq,
            ack,
            receiver_ack: ack,
            time_ns,
            ..cookie_ack(key, time_ns)
        };
        for event in [
            segment(Direction::FromServer, FIN | ACK, 501, 101, 20_000_000),
            segment(Direction::FromClient, FIN | ACK, 101, 502, 21_000_000),
            segment(Direction::FromServer, ACK, 502, 102, 22_000_000),
        ] {
            tracker.on_event(&event, &mut effects).unwrap();
        }
        let old = tracker.get(&key).unwrap().connection.states();
        assert_eq!(old, (TcpState::Closed, TcpState::TimeWait));
        effects.clear();
        tracker
            .on_event(
                &segment(Direction::FromServer, SYN | ACK, 9000, 70_001, 30_000_000),
                &mut effects,
            )
            .unwrap();
        assert!(matches!(
            effects[0],
            Effect::Closed {
                reason: CloseReason::Fin,
                forget: false,
                ..
            }
        ));
        assert_eq!(
            effects[1],
            Effect::Opened {
                origin: Origin::Kernel
            }
        );
        let tracked = tracker.get(&key).unwrap();
        assert_eq!(tracked.origin, Origin::Kernel);
        assert_eq!(
            tracked.connection.states(),
            (TcpState::Established, TcpState::SynReceived)
        );
        tracker
            .on_event(
                &segment(Direction::FromClient, ACK, 70_001, 9001, 31_000_000),
                &mut effects,
            )
            .unwrap();
        assert_eq!(
            tracker.get(&key).unwrap().connection.states(),
            (TcpState::Established, TcpState::Established)
        );
        assert_eq!(tracker.len(), 1);
    }

    #[test]
    fn an_event_of_unknown_kind_or_direction_is_an_error_and_changes_nothing() {
        let mut tracker = Tracker::new(Timeouts::default(), 0);
        let mut effects = Vec::new();
        let unknown_kind = LifecycleEvent {
            kind: 9,
            ..cookie_ack(key(5, 1000), 10_000_000)
        };
        let error = tracker.on_event(&unknown_kind, &mut effects).unwrap_err();
        assert_eq!(
            (error.field, error.value),
            ("kind", 9),
            "not taken for a segment"
        );
        let unknown_direction = LifecycleEvent {
            direction: 2,
            ..cookie_ack(key(5, 1000), 10_000_000)
        };
        let error = tracker
            .on_event(&unknown_direction, &mut effects)
            .unwrap_err();
        assert_eq!((error.field, error.value), ("direction", 2));
        assert!(tracker.is_empty());
        assert!(effects.is_empty());
    }

    #[test]
    fn expiry_asks_the_data_plane_before_reaping() {
        let timeouts = Timeouts::default();
        let horizon = timeouts.established.as_nanos() as u64;
        let mut tracker = Tracker::new(timeouts, 0);
        let mut effects = Vec::new();
        tracker
            .on_event(&cookie_ack(key(3, 1000), 10_000_000), &mut effects)
            .unwrap();
        effects.clear();
        let later = horizon + 20_000_000;
        tracker.expire(later, |_| Some(later - 1), &mut effects);
        assert!(effects.is_empty(), "data was seen a moment ago");
        tracker.expire(later + horizon, |_| Some(later - 1), &mut effects);
        assert!(matches!(
            effects[0],
            Effect::Closed {
                reason: CloseReason::Timeout,
                ..
            }
        ));
        assert!(tracker.is_empty());
    }
}
