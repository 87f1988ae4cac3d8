//! Layouts shared by the XDP program and the daemon. Each is defined once, here.
#![no_std]

mod config;
mod counter;

pub use config::{FAMILY_IPV4, FAMILY_IPV6, NO_WINDOW_SCALE, ProtectedPort, SynCookieConfig};
pub use counter::{Counter, CounterKind};

/// Names of the maps in the eBPF object, as the daemon looks them up.
pub mod maps {
    /// `PerCpuArray<u64>` indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `Array<ProtectedPort>` with one entry per TCP port (index = port number).
    pub const PROTECTED_PORTS: &str = "PROTECTED_PORTS";
    /// `Array<SynCookieConfig>` with a single entry.
    pub const SYN_COOKIE_CONFIG: &str = "SYN_COOKIE_CONFIG";
}

/// TCP header flag bits (RFC 9293 §3.1), as they sit in byte 13 of the header.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

/// Name of the XDP program in the eBPF object.
pub const XDP_PROGRAM: &str = "tcpguard";

/// Entries in [`maps::PROTECTED_PORTS`]: one per possible TCP port.
pub const PORT_COUNT: u32 = 65536;
