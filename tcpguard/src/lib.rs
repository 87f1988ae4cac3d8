//! tcpguard's daemon as a library: loading and attaching the XDP program, the sysctls it needs,
//! and reading its counters. The `tcpguard` binary is a thin CLI over it.

pub mod connection;
pub mod ebpf;
pub mod guard;
pub mod sysctl;
pub mod tcp_state;

pub use guard::{AttachMode, Attachment, Counters, Guard, GuardError};
