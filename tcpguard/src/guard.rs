//! The XDP program loaded into the kernel, its maps written, and (once attached) its link.

use std::{collections::BTreeSet, fmt, str::FromStr};

use aya::{
    Ebpf, EbpfError,
    maps::{Array, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use log::info;
use tcpguard_common::{
    Counter, FAMILY_IPV4, FAMILY_IPV6, ProtectedPort, SynCookieConfig, XDP_PROGRAM, maps,
};

use crate::ebpf::TCPGUARD_OBJECT;

/// How the XDP program is attached to the interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode when the driver has no XDP support.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic mode, in the kernel's receive path after the driver.
    Skb,
}

impl FromStr for AttachMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "skb" => Ok(Self::Skb),
            other => Err(format!(
                "XDP mode {other:?} is not one of auto, native, skb"
            )),
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Skb => "skb",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot load tcpguard's eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("the eBPF object has no {0} map")]
    MissingMap(&'static str),
    #[error("the eBPF object has no XDP program {XDP_PROGRAM:?}")]
    MissingProgram,
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("the kernel rejected the XDP program: {0}")]
    Verifier(ProgramError),
    #[error("interface {0:?} does not exist")]
    UnknownInterface(String),
    #[error("cannot attach XDP to {interface} in {mode} mode: {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        source: ProgramError,
    },
}

/// The program loaded and configured, attached to at most one interface.
pub struct Guard {
    ebpf: Ebpf,
    attachment: Option<Attachment>,
}

/// Where the program is attached, in which mode.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    pub mode: &'static str,
    link: XdpLinkId,
}

impl Guard {
    /// Loads the program and writes `ports` (protected for IPv4 and IPv6) and `config`; nothing
    /// is attached yet.
    pub fn load(ports: &BTreeSet<u16>, config: SynCookieConfig) -> Result<Self, GuardError> {
        let mut ebpf = Ebpf::load(TCPGUARD_OBJECT)?;
        {
            let map = ebpf
                .map_mut(maps::PROTECTED_PORTS)
                .ok_or(GuardError::MissingMap(maps::PROTECTED_PORTS))?;
            let mut protected: Array<_, ProtectedPort> =
                Array::try_from(map).map_err(map_error(maps::PROTECTED_PORTS))?;
            let entry = ProtectedPort {
                families: FAMILY_IPV4 | FAMILY_IPV6,
            };
            for &port in ports {
                protected
                    .set(u32::from(port), entry, 0)
                    .map_err(map_error(maps::PROTECTED_PORTS))?;
            }
        }
        {
            let map = ebpf
                .map_mut(maps::SYN_COOKIE_CONFIG)
                .ok_or(GuardError::MissingMap(maps::SYN_COOKIE_CONFIG))?;
            let mut cookie: Array<_, SynCookieConfig> =
                Array::try_from(map).map_err(map_error(maps::SYN_COOKIE_CONFIG))?;
            cookie
                .set(0, config, 0)
                .map_err(map_error(maps::SYN_COOKIE_CONFIG))?;
        }
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or(GuardError::MissingProgram)?
            .try_into()
            .map_err(GuardError::Verifier)?;
        program.load().map_err(GuardError::Verifier)?;
        Ok(Self {
            ebpf,
            attachment: None,
        })
    }

    /// The loaded program, for BPF_PROG_TEST_RUN.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(XDP_PROGRAM)
            .and_then(|program| program.try_into().ok())
            .expect("Guard::load checked the program exists and is XDP")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(XDP_PROGRAM)
            .and_then(|program| program.try_into().ok())
            .expect("Guard::load checked the program exists and is XDP")
    }

    /// Attaches to `interface`. In [`AttachMode::Auto`], native mode is tried first and generic
    /// mode used, with a log line, when the driver refuses it.
    pub fn attach(&mut self, interface: &str, mode: AttachMode) -> Result<&Attachment, GuardError> {
        if if_index(interface).is_none() {
            return Err(GuardError::UnknownInterface(interface.to_owned()));
        }
        let attempt = |guard: &mut Self, xdp_mode: XdpMode, name: &'static str| {
            guard
                .program_mut()
                .attach(interface, xdp_mode)
                .map(|link| (link, name))
                .map_err(|source| GuardError::Attach {
                    interface: interface.to_owned(),
                    mode: name,
                    source,
                })
        };
        let (link, mode) = match mode {
            AttachMode::Native => attempt(self, XdpMode::Driver, "native")?,
            AttachMode::Skb => attempt(self, XdpMode::Skb, "skb")?,
            AttachMode::Auto => match attempt(self, XdpMode::Driver, "native") {
                Ok(attached) => attached,
                Err(native) => {
                    info!("{native}; falling back to generic (skb) mode");
                    attempt(self, XdpMode::Skb, "skb")?
                }
            },
        };
        Ok(self.attachment.insert(Attachment {
            interface: interface.to_owned(),
            mode,
            link,
        }))
    }

    pub fn attachment(&self) -> Option<&Attachment> {
        self.attachment.as_ref()
    }

    /// Detaches from the interface, if attached.
    pub fn detach(&mut self) -> Result<(), GuardError> {
        if let Some(Attachment {
            interface,
            mode,
            link,
        }) = self.attachment.take()
        {
            self.program_mut()
                .detach(link)
                .map_err(|source| GuardError::Attach {
                    interface,
                    mode,
                    source,
                })?;
        }
        Ok(())
    }

    /// Every counter summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> Result<Counters, GuardError> {
        let map = self
            .ebpf
            .map(maps::COUNTERS)
            .ok_or(GuardError::MissingMap(maps::COUNTERS))?;
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(map_error(maps::COUNTERS))?;
        let mut totals = Counters::default();
        for counter in Counter::ALL {
            let per_cpu = counters
                .get(&counter.index(), 0)
                .map_err(map_error(maps::COUNTERS))?;
            totals.values[counter.index() as usize] = per_cpu.iter().sum();
        }
        Ok(totals)
    }
}

/// A snapshot of the verdict counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    values: Vec<u64>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            values: vec![0; Counter::ALL.len()],
        }
    }
}

impl Counters {
    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter.index() as usize]
    }

    /// How much each counter grew since `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            values: self
                .values
                .iter()
                .zip(&earlier.values)
                .map(|(now, then)| now.saturating_sub(*then))
                .collect(),
        }
    }

    /// The counters that are not zero, in table order.
    pub fn nonzero(&self) -> impl Iterator<Item = (Counter, u64)> + '_ {
        Counter::ALL
            .iter()
            .map(|&counter| (counter, self.get(counter)))
            .filter(|&(_, value)| value != 0)
    }
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> GuardError {
    move |source| GuardError::Map { name, source }
}

/// The interface's index, if it exists in this network namespace.
pub fn if_index(interface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(interface).ok()?;
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}
