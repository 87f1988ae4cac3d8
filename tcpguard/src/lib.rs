//! tcpguard's daemon as a library: loading and attaching the XDP program, the sysctls it needs,
//! and reading its counters. The `tcpguard` binary is a thin CLI over it.

pub mod bpffs;
mod clock;
pub mod config;
pub mod connection;
pub mod control;
pub mod cookies;
pub mod daemon;
pub mod ebpf;
pub mod guard;
pub mod host;
mod http;
pub mod kernel;
pub mod links;
pub mod logging;
pub mod metrics;
mod notify;
pub mod prefix;
pub mod reqsk;
pub mod sysctl;
pub mod tc;
pub mod tcp_state;
pub mod tracker;
pub mod watch;

pub use config::AttachMode;
pub use guard::{AttachedMode, Attachment, Counters, Guard, GuardError};
