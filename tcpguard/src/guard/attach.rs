//! Attaching the loaded programs to an interface (XDP on ingress, TC on egress), or adopting
//! the links an earlier daemon pinned, and ending the attachment: released for the next daemon,
//! or detached.

use std::{
    ffi::CString,
    fmt, fs, io,
    path::{Path, PathBuf},
};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
    links::{FdLink, LinkType, PinnedLink},
    tc::{SchedClassifierLink, TcAttach},
    xdp::XdpLink,
};
use log::info;
use tcpguard_common::EGRESS_PROGRAM;

use super::{Guard, GuardError, if_index, load::program_mut};
use crate::{
    bpffs,
    config::AttachMode,
    links,
    tc::{self, TcMode},
};

/// The mode XDP runs in: what [`AttachMode`] resolved to on the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    /// Native (driver) mode.
    Native,
    /// Generic mode, in the kernel's receive path after the driver.
    Skb,
}

impl AttachedMode {
    fn xdp_mode(self) -> XdpMode {
        match self {
            Self::Native => XdpMode::Driver,
            Self::Skb => XdpMode::Skb,
        }
    }
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Skb => "skb",
        })
    }
}

/// Where the programs are attached, in which mode, and whether an earlier daemon did it.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    pub mode: AttachedMode,
    /// How the TC egress program is attached.
    pub tc_mode: TcMode,
    /// The links were found pinned and their programs replaced in place.
    pub adopted: bool,
    /// The XDP link. Held for its drop: closing the last reference to an unpinned link
    /// detaches it.
    #[expect(dead_code, reason = "held only to be dropped")]
    xdp: FdLink,
    tc: TcLink,
}

/// The TC egress attachment. Held for its drop, which detaches an unpinned TCX link and deletes
/// a netlink filter.
#[derive(Debug)]
enum TcLink {
    #[expect(dead_code, reason = "held only to be dropped")]
    Tcx(FdLink),
    Netlink(SchedClassifierLink),
}

impl Guard {
    /// Attaches XDP to `interface`'s ingress and TC to its egress (`tc_mode`, see
    /// [`tc::probe`]). With a pin directory that already holds this interface's links, the
    /// programs in them are replaced atomically and the modes are the ones they were attached
    /// with, as the kernel reports them. In [`AttachMode::Auto`], native mode is tried first and generic mode
    /// used, with a log line, when the driver refuses it.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: AttachMode,
        tc_mode: TcMode,
    ) -> Result<&Attachment, GuardError> {
        if if_index(interface).is_none() {
            return Err(GuardError::UnknownInterface(interface.to_owned()));
        }
        let pinned = match &self.pin_dir {
            Some(dir) => pinned_links(dir, interface)?,
            None => None,
        };
        let attachment = match pinned {
            Some(found) if found.interface == interface => self.adopt(found)?,
            Some(found) => {
                return Err(GuardError::OtherInterface {
                    pinned: found.interface,
                    wanted: interface.to_owned(),
                    dir: self.pin_dir.clone().unwrap_or_default(),
                });
            }
            None => self.attach_fresh(interface, mode, tc_mode)?,
        };
        self.attachment = Some(attachment);
        if let Some(dir) = self.pin_dir.clone() {
            self.pin_programs(&dir)?;
        }
        Ok(self.attachment.as_ref().expect("attached above"))
    }

    fn attach_fresh(
        &mut self,
        interface: &str,
        mode: AttachMode,
        tc_mode: TcMode,
    ) -> Result<Attachment, GuardError> {
        // aya takes interface names as C strings; one with a NUL byte names no interface.
        let interface_name = CString::new(interface)
            .map_err(|_| GuardError::UnknownInterface(interface.to_owned()))?;
        let xdp: &mut Xdp = program_mut(&mut self.ebpf, self.xdp)?;
        let attempt = |xdp: &mut Xdp, mode: AttachedMode| {
            xdp.attach(&interface_name, mode.xdp_mode())
                .and_then(|id| xdp.take_link(id))
                .map(|link| (link, mode))
                .map_err(|source| GuardError::Attach {
                    what: format!("XDP in {mode} mode"),
                    interface: interface.to_owned(),
                    source: source.into(),
                })
        };
        let (xdp_link, mode) = match mode {
            AttachMode::Native => attempt(xdp, AttachedMode::Native)?,
            AttachMode::Skb => attempt(xdp, AttachedMode::Skb)?,
            AttachMode::Auto => match attempt(xdp, AttachedMode::Native) {
                Ok(attached) => attached,
                Err(native) => {
                    info!("{native}; falling back to generic (skb) mode");
                    attempt(xdp, AttachedMode::Skb)?
                }
            },
        };
        let xdp_link = FdLink::try_from(xdp_link).map_err(|source| GuardError::Attach {
            what: "XDP as a BPF link".to_owned(),
            interface: interface.to_owned(),
            source: source.into(),
        })?;
        let tc: &mut SchedClassifier = program_mut(&mut self.ebpf, EGRESS_PROGRAM)?;
        let tc_error = |source: Box<dyn std::error::Error + Send + Sync>| GuardError::Attach {
            what: "the TC egress program".to_owned(),
            interface: interface.to_owned(),
            source,
        };
        let pin = |link: FdLink, path: PathBuf| {
            link.pin(&path)
                .map(FdLink::from)
                .map_err(|source| GuardError::Pin {
                    dir: path,
                    source: io::Error::other(source),
                })
        };
        let tc_link = match tc_mode {
            TcMode::Tcx => {
                let link = tc
                    .attach(
                        &interface_name,
                        TcAttach::Tcx {
                            attach_type: TcAttachType::Egress,
                            order: LinkOrder::default(),
                        },
                    )
                    .and_then(|id| tc.take_link(id))
                    .map_err(|source| tc_error(source.into()))?;
                let link = FdLink::try_from(link).map_err(|source| tc_error(source.into()))?;
                TcLink::Tcx(match &self.pin_dir {
                    Some(dir) => pin(
                        link,
                        dir.join(format!("{}{interface}", bpffs::TC_LINK_PREFIX)),
                    )?,
                    None => link,
                })
            }
            TcMode::Netlink => TcLink::Netlink(
                tc::attach_netlink(tc, &interface_name)
                    .map_err(|source| tc_error(source.into()))?,
            ),
        };
        // The pins' names tell a person listing the directory which link is which; a later
        // daemon reads where and how a link is attached from the kernel (`pinned_links`).
        let xdp = match &self.pin_dir {
            Some(dir) => pin(
                xdp_link,
                dir.join(format!("{}{mode}_{interface}", bpffs::XDP_LINK_PREFIX)),
            )?,
            None => xdp_link,
        };
        Ok(Attachment {
            interface: interface.to_owned(),
            mode,
            tc_mode,
            adopted: false,
            xdp,
            tc: tc_link,
        })
    }

    fn adopt(&mut self, found: PinnedLinks) -> Result<Attachment, GuardError> {
        let interface = found.interface.clone();
        let error =
            |what: &str, source: Box<dyn std::error::Error + Send + Sync>| GuardError::Attach {
                what: format!("{what} by replacing the pinned program"),
                interface: interface.clone(),
                source,
            };
        let xdp_link = PinnedLink::from_pin(&found.xdp)
            .map(FdLink::from)
            .map_err(|source| error("XDP", source.into()))?;
        let xdp: &mut Xdp = program_mut(&mut self.ebpf, self.xdp)?;
        let xdp_link = XdpLink::try_from(xdp_link).map_err(|source| error("XDP", source.into()))?;
        let xdp_link = xdp
            .attach_to_link(xdp_link)
            .and_then(|id| xdp.take_link(id))
            .map_err(|source| error("XDP", source.into()))?;
        let tc: &mut SchedClassifier = program_mut(&mut self.ebpf, EGRESS_PROGRAM)?;
        let (tc_mode, tc_link) = match &found.tc {
            PinnedTc::Tcx(path) => {
                let link = PinnedLink::from_pin(path)
                    .map(FdLink::from)
                    .map_err(|source| error("TC", source.into()))?;
                let link = SchedClassifierLink::try_from(link)
                    .map_err(|source| error("TC", source.into()))?;
                let link = tc
                    .attach_to_link(link)
                    .and_then(|id| tc.take_link(id))
                    .map_err(|source| error("TC", source.into()))?;
                let link = FdLink::try_from(link).map_err(|source| error("TC", source.into()))?;
                (TcMode::Tcx, TcLink::Tcx(link))
            }
            PinnedTc::Netlink => {
                let name = CString::new(interface.as_str())
                    .map_err(|_| GuardError::UnknownInterface(interface.clone()))?;
                let link =
                    tc::replace_netlink(tc, &name).map_err(|source| error("TC", source.into()))?;
                (TcMode::Netlink, TcLink::Netlink(link))
            }
        };
        Ok(Attachment {
            interface: found.interface,
            mode: found.mode,
            tc_mode,
            adopted: true,
            xdp: FdLink::try_from(xdp_link).map_err(|source| error("XDP", source.into()))?,
            tc: tc_link,
        })
    }

    pub fn attachment(&self) -> Option<&Attachment> {
        self.attachment.as_ref()
    }

    /// Leaves the programs attached through their pinned links, for the next daemon to adopt.
    /// Without a pin directory this is the same as [`Guard::detach`].
    pub fn release(mut self) -> Result<(), GuardError> {
        if self.pin_dir.is_none() {
            return self.detach();
        }
        if let Some(attachment) = self.attachment.take()
            && let TcLink::Netlink(link) = attachment.tc
        {
            // The filter belongs to the interface's qdisc, not to this process: forgetting the
            // handle, rather than dropping it, leaves it attached.
            std::mem::forget(link);
        }
        Ok(())
    }

    /// Detaches from the interface and removes everything pinned.
    pub fn detach(mut self) -> Result<(), GuardError> {
        // Pinned links are detached through their pins; the others when the last reference
        // to them, held here, goes.
        if let Some(dir) = self.pin_dir.take() {
            let foreign = bpffs::remove_pins(&dir)?;
            if !foreign.is_empty() {
                log::warn!(
                    "{} is left in place: it holds pins that are not tcpguard's ({})",
                    dir.display(),
                    foreign.join(", ")
                );
            }
        }
        self.attachment.take();
        Ok(())
    }
}

/// Links found pinned in a pin directory.
struct PinnedLinks {
    interface: String,
    mode: AttachedMode,
    xdp: PathBuf,
    tc: PinnedTc,
}

/// How the TC egress program found attached is attached.
enum PinnedTc {
    /// A TCX link, pinned at this path.
    Tcx(PathBuf),
    /// A netlink filter, recorded in the pin directory.
    Netlink,
}

/// The links an earlier daemon pinned in `dir`, if both are there (`wanted`, the interface to
/// protect, only for an error). A pin's name says which of tcpguard's links it is; the
/// interface it is attached to and, for XDP, the mode are the kernel's answers. The one
/// exception is a netlink filter, which is no BPF object the kernel could describe: its record
/// (see [`crate::tc`]) names its interface, and it counts only where that is the XDP link's.
fn pinned_links(dir: &Path, wanted: &str) -> Result<Option<PinnedLinks>, GuardError> {
    let pin_error = |path: &Path| {
        let dir = path.to_owned();
        move |source| GuardError::Pin { dir, source }
    };
    let pins: Vec<(String, PathBuf)> = fs::read_dir(dir)
        .map_err(pin_error(dir))?
        .flatten()
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, entry.path())
        })
        .collect();
    let netlink = tc::recorded(dir).map_err(pin_error(dir))?;
    let query = |what: String| move |source| GuardError::Query { what, source };
    let link_query = |path: &Path| query(format!("the link pinned at {}", path.display()));
    let named = |prefix: &'static str| {
        pins.iter()
            .filter(move |(name, _)| name.starts_with(prefix))
            .map(|(_, path)| path)
    };
    for xdp_path in named(bpffs::XDP_LINK_PREFIX) {
        let xdp = links::pinned(xdp_path).map_err(link_query(xdp_path))?;
        if !matches!(xdp.link_type(), Ok(LinkType::Xdp)) {
            continue;
        }
        // The interface of this namespace that runs the link's program, and in which mode.
        let interfaces = links::interfaces().map_err(query(
            "the XDP programs of this network namespace's interfaces".into(),
        ))?;
        let found = interfaces.into_iter().find_map(|interface| {
            let mode = if interface.xdp.driver == Some(xdp.program_id()) {
                AttachedMode::Native
            } else if interface.xdp.skb == Some(xdp.program_id()) {
                AttachedMode::Skb
            } else {
                return None;
            };
            Some((interface, mode))
        });
        let Some((interface, mode)) = found else {
            return Err(GuardError::StrayLink {
                path: xdp_path.clone(),
                wanted: wanted.to_owned(),
            });
        };
        let mut tcx = None;
        for path in named(bpffs::TC_LINK_PREFIX) {
            let link = links::pinned(path).map_err(link_query(path))?;
            if matches!(link.link_type(), Ok(LinkType::Tcx))
                && links::runs_tcx(interface.index, TcAttachType::Egress, link.program_id())
                    .map_err(query(format!(
                        "the TCX egress programs of {}",
                        interface.name
                    )))?
            {
                tcx = Some(path.clone());
            }
        }
        let interface = interface.name;
        let tc = match tcx {
            Some(path) => PinnedTc::Tcx(path),
            None if netlink.iter().any(|(recorded, _)| *recorded == interface) => PinnedTc::Netlink,
            None => continue,
        };
        return Ok(Some(PinnedLinks {
            interface,
            mode,
            xdp: xdp_path.clone(),
            tc,
        }));
    }
    Ok(None)
}
