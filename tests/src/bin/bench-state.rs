//! How fast the daemon's connection table takes lifecycle events, on one core, against a plain
//! hash map doing the same inserts, lookups and removals; and what a tracked connection costs
//! in memory.
//!
//! Each connection gets the events the data plane reports for a cookie handshake and a
//! client-initiated close: handshake ACK, client FIN, server ACK of it, server FIN, client ACK
//! of that.

use std::{collections::HashMap, hint::black_box, time::Instant};

use tcpguard::{connection::Timeouts, tracker::Tracker};
use tcpguard_common::{
    Direction::{FromClient, FromServer},
    EventKind::{CookieHandshake, Segment},
    FLOW_IPV4, FlowKey, LifecycleEvent,
    tcp_flags::{ACK, FIN},
};

const CONNECTIONS: u32 = 200_000;
const ROUNDS: usize = 5;

fn key(n: u32) -> FlowKey {
    let mut key = FlowKey {
        family: FLOW_IPV4,
        client_port: (n % 50_000) as u16 + 10_000,
        server_port: 443,
        ..FlowKey::default()
    };
    key.client_addr[..4].copy_from_slice(&(0x0a00_0000 + n / 50_000).to_be_bytes());
    key.server_addr[..4].copy_from_slice(&[192, 0, 2, 1]);
    key
}

fn lifecycle(n: u32, time: u64) -> [LifecycleEvent; 5] {
    let (client, server) = (1000u32.wrapping_mul(n), 7000u32.wrapping_mul(n));
    let event = |direction: tcpguard_common::Direction,
                 kind: tcpguard_common::EventKind,
                 flags,
                 seq: u32,
                 ack: u32,
                 receiver_ack| LifecycleEvent {
        key: key(n),
        time_ns: time,
        syn_time_ns: time - 1000,
        seq,
        ack,
        receiver_ack,
        flags,
        kind: kind as u8,
        direction: direction as u8,
        ..LifecycleEvent::default()
    };
    [
        event(
            FromClient,
            CookieHandshake,
            ACK,
            client + 1,
            server + 1,
            client + 1,
        ),
        event(
            FromClient,
            Segment,
            FIN | ACK,
            client + 1,
            server + 1,
            client + 1,
        ),
        event(FromServer, Segment, ACK, server + 1, client + 2, server + 1),
        event(
            FromServer,
            Segment,
            FIN | ACK,
            server + 1,
            client + 2,
            server + 1,
        ),
        event(FromClient, Segment, ACK, client + 2, server + 2, client + 2),
    ]
}

fn events() -> Vec<LifecycleEvent> {
    (0..CONNECTIONS)
        .flat_map(|n| lifecycle(n, 1_000_000 + u64::from(n)))
        .collect()
}

/// Events per second through the tracker.
fn tracker_rate(events: &[LifecycleEvent]) -> f64 {
    let mut tracker = Tracker::new(Timeouts::default(), 0);
    let mut effects = Vec::new();
    let start = Instant::now();
    for event in events {
        tracker.on_event(event, &mut effects).unwrap();
        effects.clear();
    }
    let elapsed = start.elapsed();
    black_box(tracker.len());
    events.len() as f64 / elapsed.as_secs_f64()
}

/// Events per second through a bare hash map: insert on the handshake, a lookup per segment.
fn baseline_rate(events: &[LifecycleEvent]) -> f64 {
    let mut table: HashMap<FlowKey, u64> = HashMap::new();
    let start = Instant::now();
    for event in events {
        if event.kind == CookieHandshake as u8 {
            table.insert(event.key, event.time_ns);
        } else if let Some(seen) = table.get_mut(&event.key) {
            *seen = event.time_ns;
        }
    }
    let elapsed = start.elapsed();
    black_box(table.len());
    events.len() as f64 / elapsed.as_secs_f64()
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|pages| pages.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Resident memory added by `count` open (established) connections in the tracker.
fn memory_for(count: u32) -> u64 {
    let before = resident_bytes();
    let mut tracker = Tracker::new(Timeouts::default(), 0);
    let mut effects = Vec::new();
    for n in 0..count {
        tracker
            .on_event(&lifecycle(n, 1_000_000)[0], &mut effects)
            .unwrap();
        effects.clear();
    }
    let after = resident_bytes();
    black_box(tracker.len());
    after.saturating_sub(before)
}

fn main() {
    let events = events();
    println!(
        "connection table, {} events ({CONNECTIONS} connections × 5), best of {ROUNDS} rounds, one core:",
        events.len()
    );
    let tracker = (0..ROUNDS)
        .map(|_| tracker_rate(&events))
        .fold(0.0, f64::max);
    let baseline = (0..ROUNDS)
        .map(|_| baseline_rate(&events))
        .fold(0.0, f64::max);
    println!("| table | events/s | × bare hash map |");
    println!("| --- | --- | --- |");
    println!(
        "| bare HashMap (baseline) | {:.2} M | 1.00 |",
        baseline / 1e6
    );
    println!(
        "| tcpguard tracker (state machine) | {:.2} M | {:.2} |",
        tracker / 1e6,
        tracker / baseline
    );
    println!();
    println!("| tracked connections | resident memory added | bytes each |");
    println!("| --- | --- | --- |");
    for count in [100_000, 1_000_000] {
        let bytes = memory_for(count);
        println!(
            "| {count} | {:.1} MiB | {} |",
            bytes as f64 / (1 << 20) as f64,
            bytes / u64::from(count)
        );
    }
}
