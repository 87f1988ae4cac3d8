//! The TC ingress classifier `tcpguard_reqsk` (`tcpguard-ebpf/c/reqsk.c`): for an ACK whose own
//! cookie the XDP program accepted, it hands the kernel the connection's attributes through the
//! kfunc `bpf_sk_assign_tcp_reqsk`. This module loads it, attaches it to an interface's ingress,
//! pins it like [`crate::Guard`] pins its programs (same directory, so `tcpguard detach`
//! removes it too), and reads its outcome counters.

use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, LinkType, PinnedLink},
        tc::{SchedClassifierLink, TcAttach},
    },
};
use tcpguard_common::maps::RARE_EVENTS;
use thiserror::Error;

use crate::{bpffs, ebpf::REQSK_OBJECT, guard::if_index, links};

/// The program's name in the object.
pub const PROGRAM: &str = tcpguard_common::REQSK_PROGRAM;
/// The per-CPU outcome counters, indexed as [`ReqskResults`] lists them.
pub const RESULTS_MAP: &str = tcpguard_common::maps::REQSK_RESULTS;
/// The kfunc the program calls.
pub const KFUNC: &str = "bpf_sk_assign_tcp_reqsk";
/// Prefix of the pinned link's name; the interface follows.
const LINK_PREFIX: &str = bpffs::REQSK_LINK_PREFIX;

const ASSIGNED: u32 = 0;
const NO_LISTENER: u32 = 1;
const REFUSED: u32 = 2;
const UNPARSED: u32 = 3;
const KERNEL_SOCKET: u32 = 4;
/// REQSK_RESULTS's entries: one per outcome above.
const RESULT_COUNT: u32 = 5;

#[derive(Debug, Error)]
pub enum ReqskError {
    #[error(
        "the running kernel has no kfunc {KFUNC} in its BTF (/sys/kernel/btf/vmlinux); it needs Linux 6.9 or later with CONFIG_DEBUG_INFO_BTF"
    )]
    KfuncMissing,
    #[error("loading the reqsk object failed: {0}")]
    Load(#[from] EbpfError),
    #[error("the reqsk object has no {0}")]
    Missing(&'static str),
    #[error("program {PROGRAM} in the reqsk object is not a TC classifier")]
    ProgramType,
    #[error("the kernel rejected program {PROGRAM}: {}", crate::guard::rejection(.0))]
    Verifier(#[source] ProgramError),
    #[error("no interface {0:?} in this network namespace")]
    UnknownInterface(String),
    #[error("attaching {PROGRAM} to the TC ingress of {interface} failed: {source}")]
    Attach {
        interface: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "{PROGRAM} is still attached to {pinned} (pinned under {dir}); run `tcpguard detach` before attaching it to {wanted}"
    )]
    OtherInterface {
        pinned: String,
        wanted: String,
        dir: PathBuf,
    },
    #[error(
        "{PROGRAM}'s link pinned at {path} is attached to {}; run `tcpguard detach` before attaching it to {wanted}",
        crate::links::NO_INTERFACE_HERE
    )]
    StrayLink { path: PathBuf, wanted: String },
    #[error(transparent)]
    PinDir(#[from] bpffs::PinDirError),
    #[error("pinning at {path} failed: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "removing {path}, pinned by an earlier tcpguard with {entries} outcome counters where this one keeps {RESULT_COUNT}, failed: {source}"
    )]
    OutgrownPin {
        path: PathBuf,
        entries: u32,
        #[source]
        source: io::Error,
    },
    #[error("reading map {RESULTS_MAP} failed: {0}")]
    Map(#[source] MapError),
}

/// What the program did with the ACKs that carried XDP's record, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReqskResults {
    /// The kfunc hung a request socket on the packet: the kernel makes the connection.
    pub assigned: u64,
    /// No socket for the 4-tuple: the listener closed after XDP checked the cookie.
    pub no_listener: u64,
    /// The kfunc returned an error.
    pub refused: u64,
    /// A record, but no TCP ACK the program could read.
    pub unparsed: u64,
    /// The kernel already has a connection for the 4-tuple, built from an earlier segment that
    /// returned the cookie (XDP judged this one before the stack had built it): the segment is
    /// that connection's.
    pub kernel_socket: u64,
}

impl ReqskResults {
    /// Each count with its label: assigned, no_listener, refused, unparsed, kernel_socket.
    pub fn by_name(&self) -> [(&'static str, u64); RESULT_COUNT as usize] {
        [
            ("assigned", self.assigned),
            ("no_listener", self.no_listener),
            ("refused", self.refused),
            ("unparsed", self.unparsed),
            ("kernel_socket", self.kernel_socket),
        ]
    }

    /// How much each count grew since `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            assigned: self.assigned.saturating_sub(earlier.assigned),
            no_listener: self.no_listener.saturating_sub(earlier.no_listener),
            refused: self.refused.saturating_sub(earlier.refused),
            unparsed: self.unparsed.saturating_sub(earlier.unparsed),
            kernel_socket: self.kernel_socket.saturating_sub(earlier.kernel_socket),
        }
    }
}

/// Removes the outcome counters pinned at `pin` when an earlier tcpguard made them with another
/// number of outcomes: aya refuses to load the program with a pinned map of another size
/// (`IncompatiblePinnedMap`), and tcpguard would not start after an upgrade. The counts start
/// again from 0.
fn remove_outgrown_results(pin: &Path) -> Result<(), ReqskError> {
    let mut entries = 0;
    let removed = bpffs::remove_outgrown_map(pin, |info| {
        entries = info.max_entries();
        entries != RESULT_COUNT
    })
    .map_err(|source| ReqskError::OutgrownPin {
        path: pin.to_owned(),
        entries,
        source,
    })?;
    if removed.is_none() {
        return Ok(());
    }
    log::warn!(
        "{RESULTS_MAP} pinned at {} had {entries} outcome counters, this tcpguard keeps {RESULT_COUNT}: replaced, its counts start again from 0",
        pin.display()
    );
    Ok(())
}

/// Whether the running kernel offers the kfunc. The kernel's BTF is asked, not /proc/kallsyms:
/// a kfunc is callable only through its BTF entry, which is what aya resolves the program's
/// `.ksyms` relocation against and what the verifier checks the call with; a kallsyms symbol
/// says only that the function was compiled in.
pub fn kfunc_available() -> bool {
    fs::read("/sys/kernel/btf/vmlinux").is_ok_and(|btf| btf_has_name(&btf, KFUNC))
}

/// Whether `name` is in the string section of raw BTF (native byte order): every named BTF
/// type has its name there, and a function's name is no other type's.
fn btf_has_name(btf: &[u8], name: &str) -> bool {
    const MAGIC: u16 = 0xeb9f;
    let u32_at = |offset: usize| {
        btf.get(offset..offset + 4)
            .map(|bytes| u32::from_ne_bytes(bytes.try_into().unwrap()) as usize)
    };
    if btf.get(0..2).map(|b| u16::from_ne_bytes([b[0], b[1]])) != Some(MAGIC) {
        return false;
    }
    // struct btf_header: magic, version, flags, hdr_len, type_off, type_len, str_off, str_len.
    let (Some(header_len), Some(str_off), Some(str_len)) = (u32_at(4), u32_at(16), u32_at(20))
    else {
        return false;
    };
    let start = header_len + str_off;
    let Some(strings) = btf.get(start..start + str_len) else {
        return false;
    };
    strings
        .split(|&byte| byte == 0)
        .any(|string| string == name.as_bytes())
}

/// The classifier, loaded, and its link once attached.
pub struct Reqsk {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    /// Held for its drop: closing the last reference to an unpinned link detaches it.
    link: Option<(String, FdLink)>,
}

impl Reqsk {
    /// Loads the program (the verifier runs here). With a pin directory (on a BPF filesystem,
    /// usually the one the [`crate::Guard`] uses) its counters are pinned there, or reused with
    /// their counts if an earlier daemon pinned them.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self, ReqskError> {
        if !kfunc_available() {
            return Err(ReqskError::KfuncMissing);
        }
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            bpffs::prepare_pin_dir(dir)?;
            let pin = dir.join(RESULTS_MAP);
            remove_outgrown_results(&pin)?;
            loader.map_pin_path(RESULTS_MAP, pin);
        }
        let mut ebpf = loader.load(REQSK_OBJECT)?;
        program_mut(&mut ebpf)?
            .load()
            .map_err(ReqskError::Verifier)?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.map(Path::to_owned),
            link: None,
        })
    }

    /// The instructions the verifier processed to accept the program, if the kernel says.
    #[cfg(feature = "testing")]
    pub fn verified_instructions(&self) -> Option<u32> {
        let program: &SchedClassifier = self.ebpf.program(PROGRAM)?.try_into().ok()?;
        program.info().ok()?.verified_instruction_count()
    }

    /// Attaches the program to `interface`'s TC ingress (a TCX link). With a pin directory that
    /// already holds this interface's link, the program in it is replaced atomically.
    pub fn attach(&mut self, interface: &str) -> Result<(), ReqskError> {
        if if_index(interface).is_none() {
            return Err(ReqskError::UnknownInterface(interface.to_owned()));
        }
        let attach_error = |source: Box<dyn std::error::Error + Send + Sync>| ReqskError::Attach {
            interface: interface.to_owned(),
            source,
        };
        let pinned = match self.pin_dir.as_deref().map(link_pin).transpose()?.flatten() {
            Some(path) => {
                let attached =
                    attached_interface(&path).map_err(|source| attach_error(source.into()))?;
                Some((attached, path))
            }
            None => None,
        };
        let program = program_mut(&mut self.ebpf)?;
        let link = match pinned {
            Some((Some(pinned), path)) if pinned == interface => {
                let link = PinnedLink::from_pin(&path)
                    .map(FdLink::from)
                    .map_err(|source| attach_error(source.into()))?;
                let link = SchedClassifierLink::try_from(link)
                    .map_err(|source| attach_error(source.into()))?;
                let link = program
                    .attach_to_link(link)
                    .and_then(|id| program.take_link(id))
                    .map_err(|source| attach_error(source.into()))?;
                FdLink::try_from(link).map_err(|source| attach_error(source.into()))?
            }
            Some((Some(pinned), _)) => {
                return Err(ReqskError::OtherInterface {
                    pinned,
                    wanted: interface.to_owned(),
                    dir: self.pin_dir.clone().unwrap_or_default(),
                });
            }
            Some((None, path)) => {
                return Err(ReqskError::StrayLink {
                    path,
                    wanted: interface.to_owned(),
                });
            }
            None => {
                let name = CString::new(interface)
                    .map_err(|_| ReqskError::UnknownInterface(interface.to_owned()))?;
                // TCX, chosen explicitly: the kfunc came in 6.9, after TCX (6.6).
                let link = program
                    .attach(
                        &name,
                        TcAttach::Tcx {
                            attach_type: TcAttachType::Ingress,
                            order: LinkOrder::default(),
                        },
                    )
                    .and_then(|id| program.take_link(id))
                    .map_err(|source| attach_error(source.into()))?;
                let link = FdLink::try_from(link).map_err(|source| attach_error(source.into()))?;
                match &self.pin_dir {
                    Some(dir) => {
                        let path = dir.join(format!("{LINK_PREFIX}{interface}"));
                        link.pin(&path)
                            .map(FdLink::from)
                            .map_err(|source| ReqskError::Pin {
                                path,
                                source: io::Error::other(source),
                            })?
                    }
                    None => link,
                }
            }
        };
        if let Some(dir) = &self.pin_dir {
            let path = dir.join(bpffs::program_pin(PROGRAM));
            // An earlier daemon's program: no longer attached anywhere.
            remove_if_present(&path)?;
            program.pin(&path).map_err(|source| ReqskError::Pin {
                path,
                source: io::Error::other(source),
            })?;
        }
        self.link = Some((interface.to_owned(), link));
        Ok(())
    }

    /// The interface the program is attached to.
    pub fn interface(&self) -> Option<&str> {
        self.link.as_ref().map(|(interface, _)| interface.as_str())
    }

    /// The outcome counters, summed over CPUs.
    pub fn results(&self) -> Result<ReqskResults, ReqskError> {
        let map = self
            .ebpf
            .map(RESULTS_MAP)
            .ok_or(ReqskError::Missing(RESULTS_MAP))?;
        let counts: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(ReqskError::Map)?;
        let sum = |index| {
            counts
                .get(&index, 0)
                .map(|values| values.iter().sum::<u64>())
                .map_err(ReqskError::Map)
        };
        Ok(ReqskResults {
            assigned: sum(ASSIGNED)?,
            no_listener: sum(NO_LISTENER)?,
            refused: sum(REFUSED)?,
            unparsed: sum(UNPARSED)?,
            kernel_socket: sum(KERNEL_SOCKET)?,
        })
    }

    /// The program's rare-event ring (its failures, for the daemon's log), taken out to be
    /// polled.
    pub fn take_rare_events(&mut self) -> Result<RingBuf<MapData>, ReqskError> {
        let map = self
            .ebpf
            .take_map(RARE_EVENTS)
            .ok_or(ReqskError::Missing(RARE_EVENTS))?;
        RingBuf::try_from(map).map_err(ReqskError::Map)
    }

    /// Leaves the program attached through its pinned link, for the next daemon to adopt.
    /// Without a pin directory this is the same as [`Reqsk::detach`].
    pub fn release(mut self) -> Result<(), ReqskError> {
        if self.pin_dir.is_none() {
            return self.detach();
        }
        self.link.take();
        Ok(())
    }

    /// Detaches from the interface and removes this program's pins (its link, program and
    /// counters), leaving the rest of the pin directory to [`crate::Guard`].
    pub fn detach(mut self) -> Result<(), ReqskError> {
        if let Some(dir) = self.pin_dir.take() {
            if let Some(path) = link_pin(&dir)? {
                bpffs::detach_pinned_link(&path)
                    .map_err(|source| ReqskError::Pin { path, source })?;
            }
            remove_if_present(&dir.join(bpffs::program_pin(PROGRAM)))?;
            remove_if_present(&dir.join(RESULTS_MAP))?;
        }
        self.link.take();
        Ok(())
    }
}

/// The path of the link pinned in `dir`, if there is one. Its name says only that it is this
/// program's link: where it is attached is the kernel's answer ([`attached_interface`]).
fn link_pin(dir: &Path) -> Result<Option<PathBuf>, ReqskError> {
    let entries = fs::read_dir(dir).map_err(|source| ReqskError::Pin {
        path: dir.to_owned(),
        source,
    })?;
    Ok(entries.flatten().find_map(|entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        (name.len() > LINK_PREFIX.len() && name.starts_with(LINK_PREFIX)).then(|| entry.path())
    }))
}

/// The interface of this network namespace the TCX link pinned at `path` is attached to:
/// the one that runs the link's program on its TC ingress; `None` if none does (the link's
/// interface is gone, or in another namespace).
fn attached_interface(path: &Path) -> io::Result<Option<String>> {
    let link = links::pinned(path)?;
    if !matches!(link.link_type(), Ok(LinkType::Tcx)) {
        return Ok(None);
    }
    links::tcx_interface(link.program_id(), TcAttachType::Ingress)
}

/// Removes the pin at `path`, if there is one.
fn remove_if_present(path: &Path) -> Result<(), ReqskError> {
    bpffs::remove_pin(path).map_err(|source| ReqskError::Pin {
        path: path.to_owned(),
        source,
    })
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, ReqskError> {
    ebpf.program_mut(PROGRAM)
        .ok_or(ReqskError::Missing(PROGRAM))?
        .try_into()
        .map_err(|_| ReqskError::ProgramType)
}

#[cfg(test)]
mod tests {
    use super::btf_has_name;

    /// A BTF blob with only a header and a string section.
    fn btf_with_strings(strings: &[u8]) -> Vec<u8> {
        let mut btf = Vec::new();
        btf.extend(0xeb9f_u16.to_ne_bytes());
        btf.extend([1, 0]); // version, flags
        for field in [24u32, 0, 0, 0, strings.len() as u32] {
            btf.extend(field.to_ne_bytes());
        }
        btf.extend(strings);
        btf
    }

    #[test]
    fn finds_a_whole_name_in_the_string_section() {
        let btf = btf_with_strings(b"\0int\0bpf_sk_assign_tcp_reqsk\0");
        assert!(btf_has_name(&btf, "bpf_sk_assign_tcp_reqsk"));
        assert!(!btf_has_name(&btf, "bpf_sk_assign"));
        assert!(!btf_has_name(&btf, "assign_tcp_reqsk"));
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(!btf_has_name(b"", "int"));
        assert!(!btf_has_name(&[0x9f, 0xeb, 1, 0], "int"));
        let mut truncated = btf_with_strings(b"\0int\0");
        truncated.truncate(26);
        assert!(!btf_has_name(&truncated, "int"));
    }
}
