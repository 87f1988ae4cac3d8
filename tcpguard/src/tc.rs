//! How the TC egress program is attached: a TCX link where the kernel has TCX (Linux 6.6 and
//! later), a filter in the interface's clsact qdisc, added through netlink, where it does not.
//! Which one is chosen at start by asking the kernel, not by its version.
//!
//! A TCX link is a BPF link and is pinned like the XDP link. A netlink filter is no BPF object:
//! it belongs to the interface's qdisc and stays attached, holding its program, until it is
//! deleted or the interface goes, whatever becomes of the process that added it. tcpguard adds
//! it at a priority and handle of its own, so that a later daemon finds it and swaps the program
//! inside it in place, and records it in the pin directory with a pin of its program named
//! `tc_netlink_<network namespace inode>_<interface>`, which `tcpguard detach` reads to delete it.

use std::{
    ffi::{CStr, CString},
    fmt, fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLink, TcAttach, TcError, TcHandle},
    },
    sys::SyscallError,
};
use log::info;
use tcpguard_common::EGRESS_PROGRAM;

use crate::cookies::kernel_release;

/// The release that brought TCX.
pub const TCX_SINCE: &str = "6.6";
/// Set to `1`, it makes tcpguard attach TC through netlink even where the kernel has TCX: for
/// tests, so that the netlink path runs on the test machines' kernels too. The choice says so
/// wherever it is shown.
pub const FORCE_NETLINK_ENV: &str = "TCPGUARD_TEST_TC_NETLINK";
/// The netlink filter's priority: one of tcpguard's own, below the 49152 the kernel gives the
/// first filter added without one, so that it runs before those. Its program only observes
/// (it returns TC_ACT_UNSPEC, "continue"), so its place changes no other filter's verdict.
pub const PRIORITY: u16 = 0x7467;
/// The netlink filter's handle within its priority.
pub const HANDLE: TcHandle = TcHandle::new(0, 1);
/// Prefix of the pin that records a netlink filter.
pub const MARKER_PREFIX: &str = "tc_netlink_";

/// How the TC egress program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcMode {
    /// A TCX link (a BPF link), pinned.
    Tcx,
    /// A filter in the interface's clsact qdisc, through netlink.
    Netlink,
}

impl fmt::Display for TcMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx",
            Self::Netlink => "netlink",
        })
    }
}

/// The TC attach mode for this kernel, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcChoice {
    pub mode: TcMode,
    pub reason: String,
}

/// Asks the kernel whether it has TCX: a TCX query of `interface`'s egress succeeds where it
/// does, and fails with EINVAL (an attach type it does not know) where it does not.
pub fn probe(interface: &CStr) -> Result<TcChoice, ProgramError> {
    let release = kernel_release();
    let has_tcx = match SchedClassifier::query_tcx(interface, TcAttachType::Egress) {
        Ok(_) => true,
        Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::EINVAL) =>
        {
            false
        }
        Err(err) => return Err(err),
    };
    let forced = std::env::var(FORCE_NETLINK_ENV).is_ok_and(|value| value == "1");
    Ok(match (has_tcx, forced) {
        (true, false) => TcChoice {
            mode: TcMode::Tcx,
            reason: format!("kernel {release} has TCX"),
        },
        (true, true) => TcChoice {
            mode: TcMode::Netlink,
            reason: format!("{FORCE_NETLINK_ENV}=1 (a test override; kernel {release} has TCX)"),
        },
        (false, _) => TcChoice {
            mode: TcMode::Netlink,
            reason: format!("kernel {release} has no TCX (Linux {TCX_SINCE}+)"),
        },
    })
}

/// Adds the clsact qdisc to `interface` unless it is there, removes a filter an earlier
/// tcpguard left (a daemon that was killed, say), and adds `program` as tcpguard's filter.
pub fn attach_netlink(
    program: &mut SchedClassifier,
    interface: &CStr,
) -> Result<SchedClassifierLink, ProgramError> {
    match tc::qdisc_add_clsact(interface) {
        Err(TcError::NetlinkError(err)) if err.raw_os_error() == Some(libc::EEXIST) => {}
        added => added?,
    }
    match tc::qdisc_detach_program(interface, TcAttachType::Egress.into(), EGRESS_PROGRAM) {
        Ok(()) => info!(
            "removed the TC egress filter an earlier tcpguard left on {}",
            interface.to_string_lossy()
        ),
        Err(TcError::IoError(err)) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err.into()),
    }
    let id = program.attach(
        interface,
        TcAttach::Netlink {
            parent: TcAttachType::Egress.into(),
            options: NlOptions {
                priority: PRIORITY,
                handle: HANDLE,
                classid: None,
            },
        },
    )?;
    program.take_link(id)
}

/// Puts `program` into tcpguard's filter on `interface` in place (the kernel swaps the program
/// of a filter at a given priority and handle atomically), or adds the filter if it is gone.
pub fn replace_netlink(
    program: &mut SchedClassifier,
    interface: &CStr,
) -> Result<SchedClassifierLink, ProgramError> {
    let link = SchedClassifierLink::attached(
        interface,
        TcAttachType::Egress.into(),
        PRIORITY,
        HANDLE,
        None,
    )?;
    match program.attach_to_link(link) {
        Ok(id) => program.take_link(id),
        Err(ProgramError::TcError(TcError::NetlinkError(err)))
            if err.raw_os_error() == Some(libc::ENOENT) =>
        {
            info!(
                "tcpguard's TC egress filter on {} is gone; adding it again",
                interface.to_string_lossy()
            );
            attach_netlink(program, interface)
        }
        Err(err) => Err(err),
    }
}

/// The pin that records tcpguard's netlink filter on `interface` in this network namespace.
pub fn marker(dir: &Path, interface: &str) -> io::Result<PathBuf> {
    Ok(dir.join(format!(
        "{MARKER_PREFIX}{}_{interface}",
        network_namespace()?
    )))
}

/// The interface of the netlink filter recorded in `dir`, with the pin that records it.
pub fn recorded(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    Ok(fs::read_dir(dir)?
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (_, interface) = name.strip_prefix(MARKER_PREFIX)?.split_once('_')?;
            Some((interface.to_owned(), entry.path()))
        })
        .collect())
}

/// Deletes the netlink filters recorded in `dir`, and their records. A filter whose interface
/// is gone went with it. A filter recorded in another network namespace cannot be reached from
/// this one: that is an error, and nothing is removed.
pub fn remove_recorded(dir: &Path) -> io::Result<()> {
    let here = network_namespace()?.to_string();
    let markers: Vec<(String, String, PathBuf)> = fs::read_dir(dir)?
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (namespace, interface) = name.strip_prefix(MARKER_PREFIX)?.split_once('_')?;
            Some((namespace.to_owned(), interface.to_owned(), entry.path()))
        })
        .collect();
    if let Some((namespace, interface, _)) = markers.iter().find(|(ns, _, _)| *ns != here) {
        return Err(io::Error::other(format!(
            "tcpguard's TC egress filter on {interface} was added through netlink in network \
             namespace net:[{namespace}], and this is net:[{here}]; run `tcpguard detach` in \
             that namespace (`nsenter --net=...`)"
        )));
    }
    for (_, interface, path) in markers {
        let name = CString::new(interface.as_str()).map_err(io::Error::other)?;
        match tc::qdisc_detach_program(&name, TcAttachType::Egress.into(), EGRESS_PROGRAM) {
            Ok(()) => {}
            // Already deleted; or its interface, or its qdisc, and the filter with it, is gone.
            Err(TcError::IoError(err))
                if err.kind() == io::ErrorKind::NotFound
                    || err.raw_os_error() == Some(libc::ENODEV) => {}
            Err(TcError::NetlinkError(err))
                if matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {}
            Err(err) => {
                return Err(io::Error::other(format!(
                    "cannot delete tcpguard's TC egress filter on {interface}: {err}"
                )));
            }
        }
        fs::remove_file(path)?;
    }
    Ok(())
}

/// The inode of this process's network namespace, as `ls -l /proc/self/ns/net` shows it.
fn network_namespace() -> io::Result<u64> {
    Ok(fs::metadata("/proc/self/ns/net")?.ino())
}
