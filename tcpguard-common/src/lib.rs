//! What the eBPF programs and the daemon share, each defined once, here: layouts, counters,
//! map names, and the data-plane logic the programs call and the host tests (the cookie, the
//! header logic, the checksum, the attack decision, the reporting decision).
#![no_std]

pub mod attack;
pub mod checksum;
mod config;
pub mod cookie;
mod cookie_ack;
mod counter;
mod flow;
mod host;
mod rare;
pub mod report;
pub mod tcp;

pub use attack::{AttackConfig, AttackState};
pub use config::{
    FAMILY_IPV4, FAMILY_IPV6, NO_WINDOW_SCALE, POLICY_ALLOW, POLICY_DENY, POLICY_SLOT,
    POLICY_SOURCE_LIMIT, Policy, PortTable, ProtectedPort, SynCookieConfig,
};
pub use cookie::{COOKIE_PERIOD_S, CookieOptions, CookieReject, CookieSecrets, SynCookie};
pub use cookie_ack::{
    COOKIE_ACK_ECN, COOKIE_ACK_LEN, COOKIE_ACK_MAGIC, COOKIE_ACK_SACK, COOKIE_ACK_TIMESTAMPS,
    COOKIE_ACK_WSCALE, CookieAck,
};
pub use counter::{Counter, CounterKind};
pub use flow::{
    EVENT_RING_BYTES, EVENTS_LOST, EVENTS_SENT, FLOW_IPV4, FLOW_IPV6, Flow, FlowKey, FlowKeyV4,
    LifecycleEvent, SourceKey, SynTime,
};
pub use host::{HostAddress, HostFilter, is_for_interface, is_martian};
pub use rare::{
    LogLimit, RARE_ERROR, RARE_EVENT_RING_BYTES, RARE_LOG_INTERVAL_NS, RARE_WARN, RareEvent,
    rare_event,
};
pub use report::{
    CLIENT_UNACKED, Direction, EventKind, SERVER_UNACKED, SegmentHeader, UnknownValue,
};

/// Names of the maps in the eBPF objects, as the daemon looks them up. The programs declare
/// them by the same names (`#[map(name = ...)]` takes only a literal); tests/tests/maps.rs
/// checks that the built objects hold exactly these.
pub mod maps {
    /// `PerCpuArray<u64>` indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `Array<PortTable>` of one entry: the XDP program's global data of the same name, its
    /// section `.bss.ports` (the section's name is the map's). Each load has its own, which
    /// the daemon writes before it attaches the program, and it is never pinned: aya writes a
    /// `.bss` section's zeros into its map at every load, a pinned one included. The
    /// `PROTECTED_PORTS` pin of earlier versions (an `Array<ProtectedPort>`) is removed.
    pub const PROTECTED_PORTS: &str = ".bss.ports";
    /// `Array<SynCookieConfig>` with a single entry.
    pub const SYN_COOKIE_CONFIG: &str = "SYN_COOKIE_CONFIG";
    /// `LruHashMap<FlowKeyV4, Flow>`: the tracked IPv4 connections.
    pub const FLOWS_V4: &str = "FLOWS_V4";
    /// `LruHashMap<FlowKey, Flow>`: the tracked IPv6 connections.
    pub const FLOWS_V6: &str = "FLOWS_V6";
    /// `Array<SynTime>`: when recent SYNs were answered with a cookie, by 4-tuple hash.
    pub const SYN_TIMES: &str = "SYN_TIMES";
    /// `RingBuf` of [`crate::LifecycleEvent`].
    pub const EVENTS: &str = "EVENTS";
    /// `PerCpuArray<u64>` indexed by [`crate::EVENTS_SENT`] and [`crate::EVENTS_LOST`].
    pub const EVENT_STATS: &str = "EVENT_STATS";
    /// `Array<Policy>` with a single entry.
    pub const POLICY: &str = "POLICY";
    /// `LpmTrie<[u8; 4], u8>` per slot: IPv4 sources that skip the cookie round trip.
    pub const ALLOW_V4: [&str; 2] = ["ALLOW_V4", "ALLOW_V4_1"];
    /// `LpmTrie<[u8; 16], u8>` per slot: IPv6 sources that skip the cookie round trip.
    pub const ALLOW_V6: [&str; 2] = ["ALLOW_V6", "ALLOW_V6_1"];
    /// `LpmTrie<[u8; 4], u8>` per slot: IPv4 sources dropped in XDP.
    pub const DENY_V4: [&str; 2] = ["DENY_V4", "DENY_V4_1"];
    /// `LpmTrie<[u8; 16], u8>` per slot: IPv6 sources dropped in XDP.
    pub const DENY_V6: [&str; 2] = ["DENY_V6", "DENY_V6_1"];
    /// `HashMap<SourceKey, u8>`: sources at their limit of tracked connections.
    pub const FULL_SOURCES: &str = "FULL_SOURCES";
    /// `Array<CookieSecrets>` with a single entry: the keys of tcpguard's own cookie.
    pub const COOKIE_SECRETS: &str = "COOKIE_SECRETS";
    /// `HashMap<HostAddress, u8>`: the unicast addresses the host owns; SYNs to any other
    /// destination go to the kernel untouched.
    pub const HOST_ADDRESSES: &str = "HOST_ADDRESSES";
    /// `Array<HostFilter>` with a single entry: which addresses [`HOST_ADDRESSES`] may hold.
    pub const HOST_ADDRESS_FILTER: &str = "HOST_ADDRESS_FILTER";
    /// aya-log-ebpf's `RingBuf` of log records: the Rust programs' lines for the daemon's log,
    /// which aya-log's `EbpfLogger` reads. Not pinned: each daemon reads the ring of the
    /// programs it loaded.
    pub const AYA_LOGS: &str = "AYA_LOGS";
    /// `RingBuf` of [`crate::RareEvent`]: the TC ingress program's (C) lines for the daemon's
    /// log, which aya-log has no C side to write.
    pub const RARE_EVENTS: &str = "RARE_EVENTS";
    /// `PerCpuArray<LogLimit>`, per object: when each kind of line was last written.
    pub const RARE_LIMITS: &str = "RARE_LIMITS";
    /// `Array<AttackConfig>` with a single entry, written by the daemon.
    pub const ATTACK_CONFIG: &str = "ATTACK_CONFIG";
    /// `Array<AttackState>` with a single entry: the SYN rate and whether an attack is on.
    pub const ATTACK: &str = "ATTACK";
    /// `PerCpuArray<u64>` of the TC ingress program in C (`tcpguard-ebpf/c/reqsk.c`), in its
    /// own object: what it made of the own-cookie ACKs XDP handed it.
    pub const REQSK_RESULTS: &str = "REQSK_RESULTS";

    /// Single-entry `PerCpuArray`s the programs of tcpguard's object use as scratch space within
    /// one invocation, to keep values out of the verifier's sight or off the 512-byte stack.
    /// Never pinned or read by the daemon.
    pub const SCRATCH: &[&str] = &[
        "SYN_SCRATCH",
        "OPTIONS_SCRATCH",
        "CHECK_SCRATCH",
        "KEY_SCRATCH",
        "HOST_KEY_SCRATCH",
    ];

    /// The maps of tcpguard's object that each load has to itself besides [`SCRATCH`]: the
    /// log's ring (aya-log's), its limits, the clock's per-CPU cache and the protected ports.
    pub const UNPINNED: &[&str] = &[AYA_LOGS, RARE_LIMITS, CLOCK_CACHE, PROTECTED_PORTS];

    /// `PerCpuArray` of one entry: the coarse clock as each CPU last read it, and the tick it
    /// read it in (`tcpguard-ebpf/src/clock.rs`).
    pub const CLOCK_CACHE: &str = "CLOCK_CACHE";

    /// The maps of the TC ingress object (`tcpguard-ebpf/c/reqsk.c`).
    pub const REQSK_OBJECT: &[&str] = &[REQSK_RESULTS, RARE_EVENTS, RARE_LIMITS];

    /// Every map of tcpguard's object that is pinned; with [`UNPINNED`] and [`SCRATCH`], every
    /// map the object has besides the read-only data maps (`.rodata*`) of aya-log's levels
    /// and line texts.
    pub const ALL: &[&str] = &[
        COUNTERS,
        SYN_COOKIE_CONFIG,
        POLICY,
        FLOWS_V4,
        FLOWS_V6,
        SYN_TIMES,
        EVENTS,
        EVENT_STATS,
        ALLOW_V4[0],
        ALLOW_V6[0],
        DENY_V4[0],
        DENY_V6[0],
        ALLOW_V4[1],
        ALLOW_V6[1],
        DENY_V4[1],
        DENY_V6[1],
        FULL_SOURCES,
        HOST_ADDRESSES,
        HOST_ADDRESS_FILTER,
        COOKIE_SECRETS,
        ATTACK_CONFIG,
        ATTACK,
    ];
}

/// Capacity of each of [`maps::FLOWS_V4`] and [`maps::FLOWS_V6`] unless the daemon sets
/// another at load time.
pub const DEFAULT_FLOW_CAPACITY: u32 = 262_144;
/// Slots in [`maps::SYN_TIMES`], a power of two. A flood of 80k SYNs/s overwrites a slot about
/// once a second, far longer than a real client takes to answer.
pub const SYN_TIMES_CAPACITY: u32 = 65_536;
/// Capacity of each allow and deny trie (each slot has its own).
pub const POLICY_CAPACITY: u32 = 16_384;
/// Capacity of [`maps::HOST_ADDRESSES`]: more addresses than any one host carries.
pub const HOST_ADDRESSES_CAPACITY: u32 = 4096;
/// Capacity of [`maps::FULL_SOURCES`].
pub const FULL_SOURCES_CAPACITY: u32 = 65_536;

/// TCP header flag bits (RFC 9293 §3.1), as they sit in byte 13 of the header.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    /// ECN-Echo; with CWR on a SYN, the client asks for ECN (RFC 3168 §6.1.1).
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;
}

/// Name of the XDP program in the eBPF object that answers with the kernel's cookies
/// (listener-mode helpers).
pub const XDP_PROGRAM: &str = "tcpguard";
/// Name of the XDP program that answers with tcpguard's own cookies ([`cookie`]). The two
/// share every map; the daemon loads the one its cookie mode needs, so that the verifier checks
/// one cookie path per program.
pub const XDP_OWN_COOKIES_PROGRAM: &str = "tcpguard_own";

/// The XDP program for a cookie mode.
pub const fn xdp_program(own_cookies: bool) -> &'static str {
    if own_cookies {
        XDP_OWN_COOKIES_PROGRAM
    } else {
        XDP_PROGRAM
    }
}
/// Name of the TC egress program in the eBPF object.
pub const EGRESS_PROGRAM: &str = "tcpguard_egress";
/// Name of the TC ingress program of the own-cookie path (`tcpguard-ebpf/c/reqsk.c`).
pub const REQSK_PROGRAM: &str = "tcpguard_reqsk";
/// Every program tcpguard loads and pins.
pub const PROGRAMS: &[&str] = &[
    XDP_PROGRAM,
    XDP_OWN_COOKIES_PROGRAM,
    EGRESS_PROGRAM,
    REQSK_PROGRAM,
];

/// Entries in the [`PortTable`]: one per possible TCP port.
pub const PORT_COUNT: u32 = 65536;
