//! What tcpguard exports to Prometheus. The daemon refreshes the values from the data plane's
//! maps and its connection table; the HTTP endpoint only encodes them.

use std::collections::HashMap;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tcpguard_common::{Counter, CounterKind};

use crate::{
    connection::CloseReason,
    guard::Counters,
    reqsk::ReqskResults,
    tcp_state::TcpState,
    tracker::{Effect, InFlowMaps, Origin},
};

/// Every tcpguard series, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    packets: IntCounterVec,
    connections: IntGaugeVec,
    opened: IntCounterVec,
    closed: IntCounterVec,
    duration: HistogramVec,
    handshake: Histogram,
    flow_entries: IntGaugeVec,
    flow_capacity: IntGauge,
    events: IntCounter,
    events_lost: IntCounter,
    events_unknown: IntCounter,
    sources_at_limit: IntGauge,
    reloads: IntCounterVec,
    handovers: IntCounterVec,
    last_handovers: ReqskResults,
    under_attack: IntGauge,
    syn_rate: IntGauge,
    attacks: IntCounter,
    last_attacks: u64,
    /// The data plane's cumulative counters at the last refresh, to turn them into increments.
    last_packets: Counters,
    last_events: (u64, u64),
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once, under a distinct name");
    metric
}

impl Metrics {
    /// `cookie_mode`: "own" or "kernel", the SYN cookies that answer.
    pub fn new(start_time_seconds: f64, cookie_mode: &str) -> Self {
        let registry = Registry::new();
        let packets = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "tcpguard_xdp_packets_total",
                    "Packets judged by the XDP program, by verdict (pass, answer, drop) and reason.",
                ),
                &["verdict", "reason"],
            )
            .expect("valid metric"),
        );
        for counter in Counter::ALL {
            packets.with_label_values(&[verdict(counter.kind()), counter.name()]);
        }
        let connections = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "tcpguard_connections",
                    "Tracked connections, by the state of each end (RFC 9293 states).",
                ),
                &["client_state", "server_state"],
            )
            .expect("valid metric"),
        );
        let opened = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "tcpguard_connections_opened_total",
                    "Connections tracked, by how tracking began: cookie handshake, allow-listed SYN, or adopted.",
                ),
                &["origin"],
            )
            .expect("valid metric"),
        );
        for origin in Origin::ALL {
            opened.with_label_values(&[origin.label()]);
        }
        let closed = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "tcpguard_connections_closed_total",
                    "Connections over, by how they ended: fin, rst or timeout.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        );
        let duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "tcpguard_connection_duration_seconds",
                    "From the start of tracking to the last segment, by how the connection ended.",
                )
                .buckets(vec![
                    0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0,
                ]),
                &["reason"],
            )
            .expect("valid metric"),
        );
        for reason in CloseReason::ALL {
            closed.with_label_values(&[reason.label()]);
            duration.with_label_values(&[reason.label()]);
        }
        let handshake = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "tcpguard_handshake_duration_seconds",
                    "From the client's SYN to its handshake-completing ACK.",
                )
                .buckets(vec![
                    0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    3.0,
                ]),
            )
            .expect("valid metric"),
        );
        let flow_entries = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "tcpguard_flow_table_entries",
                    "Entries of the data plane's flow map of each family: tracked connections, less those whose entry is already gone (a client's TIME-WAIT after the server closed).",
                ),
                &["family"],
            )
            .expect("valid metric"),
        );
        let flow_capacity = register(
            &registry,
            IntGauge::new(
                "tcpguard_flow_table_capacity",
                "Connections each family's flow map holds before it evicts the least recently active.",
            )
            .expect("valid metric"),
        );
        let events = register(
            &registry,
            IntCounter::new(
                "tcpguard_lifecycle_events_total",
                "Lifecycle events the data plane reported through its ring buffer.",
            )
            .expect("valid metric"),
        );
        let events_lost = register(
            &registry,
            IntCounter::new(
                "tcpguard_lifecycle_events_lost_total",
                "Lifecycle events lost because the ring buffer was full.",
            )
            .expect("valid metric"),
        );
        let events_unknown = register(
            &registry,
            IntCounter::new(
                "tcpguard_lifecycle_events_unknown_total",
                "Lifecycle events of a kind or direction this daemon does not know, ignored.",
            )
            .expect("valid metric"),
        );
        let sources_at_limit = register(
            &registry,
            IntGauge::new(
                "tcpguard_sources_at_limit",
                "Source addresses whose new SYNs are dropped because they reached max_connections_per_source.",
            )
            .expect("valid metric"),
        );
        let reloads = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "tcpguard_config_reloads_total",
                    "Configuration reloads (SIGHUP), by result.",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "tcpguard_build_info",
                    "Always 1; the labels say which build runs.",
                ),
                &["version"],
            )
            .expect("valid metric"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let handovers = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "tcpguard_cookie_handovers_total",
                    "ACKs whose own cookie XDP accepted, by what the TC ingress program made of them: assigned (the kernel builds the connection), kernel_socket (the kernel built it already, from an earlier segment that returned the cookie), no_listener, refused (by bpf_sk_assign_tcp_reqsk), unparsed.",
                ),
                &["result"],
            )
            .expect("valid metric"),
        );
        for (label, _) in ReqskResults::default().by_name() {
            handovers.with_label_values(&[label]);
        }
        let cookies = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "tcpguard_cookie_mode",
                    "1 for the SYN cookies that answer: own (tcpguard's, through bpf_sk_assign_tcp_reqsk) or kernel (the listener-mode helpers).",
                ),
                &["mode"],
            )
            .expect("valid metric"),
        );
        for mode in ["own", "kernel"] {
            cookies
                .with_label_values(&[mode])
                .set(i64::from(mode == cookie_mode));
        }
        let under_attack = register(
            &registry,
            IntGauge::new(
                "tcpguard_under_attack",
                "1 while the SYN rate to protected ports says an attack is on (with cookies = \"under-attack\", SYNs then get cookies), else 0.",
            )
            .expect("valid metric"),
        );
        let syn_rate = register(
            &registry,
            IntGauge::new(
                "tcpguard_syn_rate",
                "SYNs per second to protected ports, measured by the data plane over its last 100-ms window.",
            )
            .expect("valid metric"),
        );
        let attacks = register(
            &registry,
            IntCounter::new(
                "tcpguard_attacks_total",
                "Attacks started: the SYN rate reached attack.syn_rate.",
            )
            .expect("valid metric"),
        );
        let start_time = register(
            &registry,
            Gauge::new(
                "tcpguard_start_time_seconds",
                "When the daemon started, in seconds since the Unix epoch.",
            )
            .expect("valid metric"),
        );
        start_time.set(start_time_seconds);
        Self {
            registry,
            packets,
            connections,
            opened,
            closed,
            duration,
            handshake,
            flow_entries,
            flow_capacity,
            events,
            events_lost,
            events_unknown,
            sources_at_limit,
            reloads,
            handovers,
            last_handovers: ReqskResults::default(),
            under_attack,
            syn_rate,
            attacks,
            last_attacks: 0,
            last_packets: Counters::default(),
            last_events: (0, 0),
        }
    }

    /// What the TC ingress program did with the ACKs XDP accepted as own cookies, as read now.
    pub fn observe_handovers(&mut self, results: ReqskResults) {
        let increase = results.since(&self.last_handovers);
        for (label, value) in increase.by_name() {
            self.handovers.with_label_values(&[label]).inc_by(value);
        }
        self.last_handovers = results;
    }

    /// The attack state as it stands now; `started` counts since the programs were loaded.
    pub fn observe_attack(&mut self, state: &tcpguard_common::AttackState) {
        self.under_attack.set(i64::from(state.active != 0));
        self.syn_rate
            .set(i64::try_from(state.rate).unwrap_or(i64::MAX));
        self.attacks
            .inc_by(state.started.saturating_sub(self.last_attacks));
        self.last_attacks = state.started;
    }

    /// The data plane's counters, as read now.
    pub fn observe_data_plane(&mut self, packets: &Counters, events: (u64, u64)) {
        for (counter, increase) in packets.since(&self.last_packets).nonzero() {
            self.packets
                .with_label_values(&[verdict(counter.kind()), counter.name()])
                .inc_by(increase);
        }
        self.last_packets = packets.clone();
        self.events
            .inc_by(events.0.saturating_sub(self.last_events.0));
        self.events_lost
            .inc_by(events.1.saturating_sub(self.last_events.1));
        self.last_events = events;
    }

    /// A lifecycle event the daemon could not read (see [`tcpguard_common::UnknownValue`]).
    pub fn observe_unknown_event(&self) {
        self.events_unknown.inc();
    }

    /// The connection table, as it stands now, and the flow map entries it accounts for.
    pub fn observe_table(
        &self,
        by_state: &HashMap<(TcpState, TcpState), usize>,
        flow_entries: InFlowMaps,
        capacity: u32,
        sources_at_limit: usize,
    ) {
        self.connections.reset();
        for ((client, server), &count) in by_state {
            self.connections
                .with_label_values(&[client.label(), server.label()])
                .set(count as i64);
        }
        for (family, entries) in [("ipv4", flow_entries.ipv4), ("ipv6", flow_entries.ipv6)] {
            self.flow_entries
                .with_label_values(&[family])
                .set(entries as i64);
        }
        self.flow_capacity.set(i64::from(capacity));
        self.sources_at_limit.set(sources_at_limit as i64);
    }

    pub fn observe_effect(&self, effect: &Effect) {
        match effect {
            Effect::Opened { origin } => self.opened.with_label_values(&[origin.label()]).inc(),
            Effect::Handshake { seconds } => self.handshake.observe(*seconds),
            Effect::Closed {
                reason, seconds, ..
            } => {
                self.closed.with_label_values(&[reason.label()]).inc();
                self.duration
                    .with_label_values(&[reason.label()])
                    .observe(*seconds);
            }
            Effect::SourceFull { .. } | Effect::Untracked { .. } => {}
        }
    }

    pub fn observe_reload(&self, success: bool) {
        self.reloads
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
    }

    /// The registry, for the HTTP endpoint (it is shared, not copied).
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }
}

/// Every series in the Prometheus text exposition format.
pub fn encode(registry: &Registry) -> Vec<u8> {
    let mut buffer = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut buffer)
        .expect("text encoding into memory does not fail");
    buffer
}

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const fn verdict(kind: CounterKind) -> &'static str {
    match kind {
        CounterKind::Pass => "pass",
        CounterKind::Answer => "answer",
        CounterKind::Drop => "drop",
    }
}
