//! The eBPF programs loaded into the kernel, their maps, and (once attached) their links:
//! XDP on the interface's ingress, TC on its egress (a TCX link, or a netlink filter where the
//! kernel has no TCX: see [`crate::tc`]). With a pin directory, maps, programs and links are
//! pinned there, so that a restarted daemon adopts them without a gap in protection.
//!
//! `load.rs`: loading the programs (and pinning them); `attach.rs`: attaching them, or adopting
//! an earlier daemon's attachment, and detaching; `maps.rs`: what the daemon writes into the
//! data plane's maps and reads back.

mod attach;
mod load;
mod maps;

use std::{collections::BTreeSet, io, path::PathBuf};

use aya::{Ebpf, EbpfError, maps::MapError};

pub use self::{
    attach::{AttachedMode, Attachment},
    load::{LoadOptions, rejection},
    maps::{Counters, FlowMap, PreparedPolicy},
};
use crate::bpffs;

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot load tcpguard's eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("the eBPF object has no {0} map")]
    MissingMap(&'static str),
    #[error("the eBPF object has no program {0:?}")]
    MissingProgram(&'static str),
    #[error(
        "program {name:?} in the eBPF object is not of the type tcpguard loads it as ({expected})"
    )]
    ProgramType {
        name: &'static str,
        expected: &'static str,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("the kernel rejected program {name}: {}", rejection(.source))]
    Verifier {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("cannot read the programs' log ring: {0}")]
    Log(aya_log::Error),
    #[error("interface {0:?} does not exist")]
    UnknownInterface(String),
    #[error("cannot attach {what} to {interface}: {source}")]
    Attach {
        what: String,
        interface: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "tcpguard is still attached to {pinned} (pinned under {dir}); run `tcpguard detach` before protecting {wanted}"
    )]
    OtherInterface {
        pinned: String,
        wanted: String,
        dir: PathBuf,
    },
    #[error("cannot ask the kernel about {what}: {source}")]
    Query { what: String, source: io::Error },
    #[error(
        "tcpguard's XDP link pinned at {path} is attached to {}; run `tcpguard detach` before protecting {wanted}",
        crate::links::NO_INTERFACE_HERE
    )]
    StrayLink { path: PathBuf, wanted: String },
    #[error(transparent)]
    PinDir(#[from] bpffs::PinDirError),
    #[error("pinning under {dir}: {source}")]
    Pin { dir: PathBuf, source: io::Error },
    #[error(
        "removing {path}, a map an earlier tcpguard pinned and this one no longer has, failed: {source}"
    )]
    RetiredPin { path: PathBuf, source: io::Error },
}

/// The programs loaded and configured, attached to at most one interface.
pub struct Guard {
    ebpf: Ebpf,
    /// The XDP program loaded: one per cookie mode.
    xdp: &'static str,
    pin_dir: Option<PathBuf>,
    attachment: Option<Attachment>,
    /// The ports written into [`maps::PROTECTED_PORTS`], which each load has to itself and
    /// starts with none protected.
    ports: BTreeSet<u16>,
    /// The interface MAC the protected ports' entries hold ([`ProtectedPort::interface_mac`]).
    interface_mac: [u8; 6],
}

/// The interface's index, if it exists in this network namespace.
pub fn if_index(interface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(interface).ok()?;
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}
