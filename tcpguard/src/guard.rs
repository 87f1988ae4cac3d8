//! The eBPF programs loaded into the kernel, their maps, and (once attached) their links:
//! XDP on the interface's ingress, TC on its egress (a TCX link, or a netlink filter where the
//! kernel has no TCX: see [`crate::tc`]). With a pin directory, maps, programs and links are
//! pinned there, so that a restarted daemon adopts them without a gap in protection.

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs, io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttach},
        xdp::XdpLink,
    },
};
use log::info;
use tcpguard_common::{
    AttackConfig, AttackState, Counter, DEFAULT_FLOW_CAPACITY, EGRESS_PROGRAM, EVENTS_LOST,
    EVENTS_SENT, FAMILY_IPV4, FAMILY_IPV6, Flow, FlowKey, HostAddress, HostFilter, InterfaceConfig,
    POLICY_ALLOW, POLICY_DENY, POLICY_SLOT, POLICY_SOURCE_LIMIT, Policy, ProtectedPort, SourceKey,
    SynCookieConfig, XDP_OWN_COOKIES_PROGRAM, XDP_PROGRAM, cookie::CookieSecrets, maps,
    xdp_program,
};

use crate::{
    bpffs,
    config::{AttachMode, SourcePolicy},
    ebpf::TCPGUARD_OBJECT,
    prefix::Prefix,
    tc::{self, TcMode},
};

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
    #[error(transparent)]
    PinDir(#[from] bpffs::PinDirError),
    #[error("pinning under {dir}: {source}")]
    Pin { dir: PathBuf, source: io::Error },
}

/// Where the programs are loaded from and kept.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Directory on a BPF filesystem for maps, programs and links; `None`: nothing pinned.
    pub pin_dir: Option<PathBuf>,
    /// Entries in the flow map.
    pub flow_capacity: u32,
    /// Load the XDP program that answers with tcpguard's own cookies rather than the
    /// kernel's.
    pub own_cookies: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_dir: None,
            flow_capacity: DEFAULT_FLOW_CAPACITY,
            own_cookies: false,
        }
    }
}

/// The programs loaded and configured, attached to at most one interface.
pub struct Guard {
    ebpf: Ebpf,
    /// The XDP program loaded: one per cookie mode.
    xdp: &'static str,
    pin_dir: Option<PathBuf>,
    attachment: Option<Attachment>,
    /// The ports written into [`maps::PROTECTED_PORTS`]; `None` before the first write (a
    /// pinned map may hold anything then).
    ports: Option<BTreeSet<u16>>,
}

/// Where the programs are attached, in which mode, and whether an earlier daemon did it.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    /// `native` or `skb`.
    pub mode: String,
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

/// Allow and deny lists written into the slot of tries not in force, with the
/// [`Policy::lists`] byte that puts them in force ([`Guard::commit_policy`]).
#[must_use = "a prepared policy takes effect only when committed"]
#[derive(Debug)]
pub struct PreparedPolicy {
    lists: u8,
}

impl Guard {
    /// Loads the programs for the kernel's cookies or (`own_cookies`) tcpguard's, unpinned, and
    /// writes `ports` (protected for IPv4 and IPv6) and `config`: what BPF_PROG_TEST_RUN tests
    /// need.
    #[cfg(feature = "testing")]
    pub fn load(
        ports: &BTreeSet<u16>,
        config: SynCookieConfig,
        own_cookies: bool,
    ) -> Result<Self, GuardError> {
        let mut guard = Self::load_with(&LoadOptions {
            own_cookies,
            ..LoadOptions::default()
        })?;
        guard.set_ports(ports)?;
        guard.set_syn_cookie_config(config)?;
        Ok(guard)
    }

    /// Loads the programs. With a pin directory, maps already pinned there (by an earlier
    /// daemon) are reused, with their flows and counters; the others are pinned there.
    pub fn load_with(options: &LoadOptions) -> Result<Self, GuardError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(maps::FLOWS, options.flow_capacity);
        let map_paths: Vec<(&str, PathBuf)> = match &options.pin_dir {
            Some(dir) => {
                bpffs::prepare_pin_dir(dir)?;
                maps::ALL
                    .iter()
                    .map(|&name| (name, dir.join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(TCPGUARD_OBJECT)?;
        let xdp_name = xdp_program(options.own_cookies);
        let xdp: &mut Xdp = program_mut(&mut ebpf, xdp_name)?;
        xdp.load().map_err(verifier(xdp_name))?;
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, EGRESS_PROGRAM)?;
        tc.load().map_err(verifier(EGRESS_PROGRAM))?;
        Ok(Self {
            ebpf,
            xdp: xdp_name,
            pin_dir: options.pin_dir.clone(),
            attachment: None,
            ports: None,
        })
    }

    /// The loaded XDP program, for BPF_PROG_TEST_RUN.
    #[cfg(feature = "testing")]
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(self.xdp)
            .and_then(|program| program.try_into().ok())
            .expect("Guard::load_with checked the program exists and is XDP")
    }

    /// The instructions the verifier processed to accept the TC egress program, if the kernel
    /// says.
    #[cfg(feature = "testing")]
    pub fn egress_verified_instructions(&self) -> Option<u32> {
        let program: &SchedClassifier = self.ebpf.program(EGRESS_PROGRAM)?.try_into().ok()?;
        program.info().ok()?.verified_instruction_count()
    }

    /// Protects exactly `ports`, for IPv4 and IPv6. Only the entries that change are written
    /// (all 65,536 the first time, since a pinned map may hold an earlier configuration's
    /// ports); when a write fails, the entries already written are put back, so the ports in
    /// force are the old ones.
    pub fn set_ports(&mut self, ports: &BTreeSet<u16>) -> Result<(), GuardError> {
        let changed: Vec<u16> = match &self.ports {
            Some(held) => held.symmetric_difference(ports).copied().collect(),
            None => (0..=u16::MAX).collect(),
        };
        let held = self.ports.take();
        let mut protected: Array<_, ProtectedPort> = self.map_mut(maps::PROTECTED_PORTS)?;
        let entry = |on: bool| ProtectedPort {
            families: if on { FAMILY_IPV4 | FAMILY_IPV6 } else { 0 },
        };
        for (done, &port) in changed.iter().enumerate() {
            let written = protected.set(u32::from(port), &entry(ports.contains(&port)), 0);
            if let Err(source) = written {
                // Put back what was written; the set in force is then `held` again (unknown,
                // and written whole next time, if there was none or the undo fails too).
                let undone = held.as_ref().is_some_and(|held| {
                    changed[..done].iter().all(|&port| {
                        protected
                            .set(u32::from(port), &entry(held.contains(&port)), 0)
                            .is_ok()
                    })
                });
                self.ports = held.filter(|_| undone);
                return Err(GuardError::Map {
                    name: maps::PROTECTED_PORTS,
                    source,
                });
            }
        }
        self.ports = Some(ports.clone());
        Ok(())
    }

    pub fn set_syn_cookie_config(&mut self, config: SynCookieConfig) -> Result<(), GuardError> {
        let mut map: Array<_, SynCookieConfig> = self.map_mut(maps::SYN_COOKIE_CONFIG)?;
        map.set(0, &config, 0)
            .map_err(map_error(maps::SYN_COOKIE_CONFIG))
    }

    /// Replaces the allow and deny lists and switches the per-source limit on or off:
    /// [`Guard::prepare_policy`], then [`Guard::commit_policy`].
    pub fn set_policy(&mut self, policy: &SourcePolicy) -> Result<(), GuardError> {
        let prepared = self.prepare_policy(policy)?;
        self.commit_policy(prepared)
    }

    /// Writes `policy`'s allow and deny lists into the slot of tries that is not in force,
    /// while the one in force goes on deciding. Nothing the data plane reads changes: when a
    /// step fails, the slot is emptied again and the lists in force are as they were.
    pub fn prepare_policy(&mut self, policy: &SourcePolicy) -> Result<PreparedPolicy, GuardError> {
        let in_force = self.policy_in_force()?;
        let slot = usize::from(in_force.lists & POLICY_SLOT == 0);
        let filled = self
            .fill_tries(maps::ALLOW_V4[slot], maps::ALLOW_V6[slot], &policy.allow)
            .and_then(|()| self.fill_tries(maps::DENY_V4[slot], maps::DENY_V6[slot], &policy.deny));
        if let Err(err) = filled {
            // Best effort: a slot left full is emptied before it is filled next time anyway.
            let _ = self.fill_tries(maps::ALLOW_V4[slot], maps::ALLOW_V6[slot], &[]);
            let _ = self.fill_tries(maps::DENY_V4[slot], maps::DENY_V6[slot], &[]);
            return Err(err);
        }
        let mut lists = if slot == 1 { POLICY_SLOT } else { 0 };
        if !policy.allow.is_empty() {
            lists |= POLICY_ALLOW;
        }
        if !policy.deny.is_empty() {
            lists |= POLICY_DENY;
        }
        if policy.source_limit {
            lists |= POLICY_SOURCE_LIMIT;
        }
        Ok(PreparedPolicy { lists })
    }

    /// Puts a prepared policy in force with one write of [`Policy::lists`]: a packet meets
    /// either the old lists or the new ones, never neither. The old slot's tries are left as
    /// they are (a packet that read the old byte may still be looking in them); the next
    /// [`Guard::prepare_policy`] empties them before it fills them.
    pub fn commit_policy(&mut self, prepared: PreparedPolicy) -> Result<(), GuardError> {
        let mut map: Array<_, Policy> = self.map_mut(maps::POLICY)?;
        map.set(
            0,
            &Policy {
                lists: prepared.lists,
                _pad: [0; 7],
            },
            0,
        )
        .map_err(map_error(maps::POLICY))?;
        // The limit is off: its marks are read no more, and go (nothing after the switch
        // can fail it).
        if prepared.lists & POLICY_SOURCE_LIMIT == 0
            && let Ok(mut full) = self.map_mut::<HashMap<_, SourceKey, u8>>(maps::FULL_SOURCES)
        {
            let keys: Vec<SourceKey> = full.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = full.remove(&key);
            }
        }
        Ok(())
    }

    fn policy_in_force(&self) -> Result<Policy, GuardError> {
        let map: Array<_, Policy> = self.map(maps::POLICY)?;
        map.get(&0, 0).map_err(map_error(maps::POLICY))
    }

    fn fill_tries(
        &mut self,
        v4_name: &'static str,
        v6_name: &'static str,
        prefixes: &[Prefix],
    ) -> Result<(), GuardError> {
        let v4 = prefixes.iter().filter_map(|prefix| match prefix.address {
            IpAddr::V4(address) => Some(Key::new(prefix.length.into(), address.octets())),
            IpAddr::V6(_) => None,
        });
        self.refill_trie(v4_name, v4)?;
        let v6 = prefixes.iter().filter_map(|prefix| match prefix.address {
            IpAddr::V6(address) => Some(Key::new(prefix.length.into(), address.octets())),
            IpAddr::V4(_) => None,
        });
        self.refill_trie(v6_name, v6)
    }

    /// Replaces every entry of the trie `name` with `keys`. Only for a trie not in force.
    fn refill_trie<K: aya::Pod>(
        &mut self,
        name: &'static str,
        keys: impl Iterator<Item = Key<K>>,
    ) -> Result<(), GuardError> {
        let mut trie: LpmTrie<_, K, u8> = self.map_mut(name)?;
        let stale: Vec<Key<K>> = trie.keys().filter_map(Result::ok).collect();
        for key in &stale {
            let _ = trie.remove(key);
        }
        for key in keys {
            retry_enomem(|| trie.insert(&key, &1, 0)).map_err(map_error(name))?;
        }
        Ok(())
    }

    /// The own cookie's keys as the data plane holds them (all zero until written).
    pub fn cookie_secrets(&self) -> Result<CookieSecrets, GuardError> {
        let map = self
            .ebpf
            .map(maps::COOKIE_SECRETS)
            .ok_or(GuardError::MissingMap(maps::COOKIE_SECRETS))?;
        let array: Array<_, CookieSecrets> =
            Array::try_from(map).map_err(map_error(maps::COOKIE_SECRETS))?;
        array.get(&0, 0).map_err(map_error(maps::COOKIE_SECRETS))
    }

    pub fn set_cookie_secrets(&mut self, secrets: &CookieSecrets) -> Result<(), GuardError> {
        let mut map: Array<_, CookieSecrets> = self.map_mut(maps::COOKIE_SECRETS)?;
        map.set(0, secrets, 0)
            .map_err(map_error(maps::COOKIE_SECRETS))
    }

    /// Tells the data plane when SYNs get cookies.
    pub fn set_attack_config(&mut self, config: AttackConfig) -> Result<(), GuardError> {
        let mut map: Array<_, AttackConfig> = self.map_mut(maps::ATTACK_CONFIG)?;
        map.set(0, &config, 0)
            .map_err(map_error(maps::ATTACK_CONFIG))
    }

    /// The SYN rate and attack state as the data plane last left them.
    pub fn attack_state(&self) -> Result<AttackState, GuardError> {
        let map = self
            .ebpf
            .map(maps::ATTACK)
            .ok_or(GuardError::MissingMap(maps::ATTACK))?;
        let array: Array<_, AttackState> = Array::try_from(map).map_err(map_error(maps::ATTACK))?;
        array.get(&0, 0).map_err(map_error(maps::ATTACK))
    }

    /// Tells the data plane the protected interface's MAC.
    pub fn set_interface(&mut self, config: InterfaceConfig) -> Result<(), GuardError> {
        let mut map: Array<_, InterfaceConfig> = self.map_mut(maps::INTERFACE)?;
        map.set(0, &config, 0).map_err(map_error(maps::INTERFACE))
    }

    /// Makes the host-address map hold exactly `addresses`: new ones are added and gone ones
    /// removed, so an address that stays is never missing for a moment. Returns what was added
    /// and what was removed.
    pub fn set_host_addresses(
        &mut self,
        addresses: &BTreeSet<HostAddress>,
    ) -> Result<(Vec<HostAddress>, Vec<HostAddress>), GuardError> {
        let mut map: HashMap<_, HostAddress, u8> = self.map_mut(maps::HOST_ADDRESSES)?;
        let held: BTreeSet<HostAddress> = map.keys().filter_map(Result::ok).collect();
        let added: Vec<HostAddress> = addresses.difference(&held).copied().collect();
        let removed: Vec<HostAddress> = held.difference(addresses).copied().collect();
        for address in &added {
            map.insert(address, &1, 0)
                .map_err(map_error(maps::HOST_ADDRESSES))?;
        }
        for address in &removed {
            match map.remove(address) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(GuardError::Map {
                        name: maps::HOST_ADDRESSES,
                        source,
                    });
                }
            }
        }
        // After the map: the filter may say "maybe" of an address the map lacks, never "no"
        // of one it holds.
        let mut filter: Array<_, HostFilter> = self.map_mut(maps::HOST_ADDRESS_FILTER)?;
        filter
            .set(0, &HostFilter::of(addresses), 0)
            .map_err(map_error(maps::HOST_ADDRESS_FILTER))?;
        Ok((added, removed))
    }

    /// Marks `source` as at (or below) its connection limit.
    pub fn set_source_full(&mut self, source: &SourceKey, full: bool) -> Result<(), GuardError> {
        let mut map: HashMap<_, SourceKey, u8> = self.map_mut(maps::FULL_SOURCES)?;
        if full {
            map.insert(source, &1, 0)
                .map_err(map_error(maps::FULL_SOURCES))
        } else {
            match map.remove(source) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(source) => Err(GuardError::Map {
                    name: maps::FULL_SOURCES,
                    source,
                }),
            }
        }
    }

    /// Attaches XDP to `interface`'s ingress and TC to its egress (`tc_mode`, see
    /// [`tc::probe`]). With a pin directory that already holds this interface's links, the
    /// programs in them are replaced atomically and `mode` and `tc_mode` are the ones they were
    /// attached with. In [`AttachMode::Auto`], native mode is tried first and generic mode
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
            Some(dir) => pinned_links(dir)?,
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
        let attempt = |xdp: &mut Xdp, xdp_mode: XdpMode, name: &'static str| {
            xdp.attach(&interface_name, xdp_mode)
                .and_then(|id| xdp.take_link(id))
                .map(|link| (link, name))
                .map_err(|source| GuardError::Attach {
                    what: format!("XDP in {name} mode"),
                    interface: interface.to_owned(),
                    source: source.into(),
                })
        };
        let (xdp_link, mode) = match mode {
            AttachMode::Native => attempt(xdp, XdpMode::Driver, "native")?,
            AttachMode::Skb => attempt(xdp, XdpMode::Skb, "skb")?,
            AttachMode::Auto => match attempt(xdp, XdpMode::Driver, "native") {
                Ok(attached) => attached,
                Err(native) => {
                    info!("{native}; falling back to generic (skb) mode");
                    attempt(xdp, XdpMode::Skb, "skb")?
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
        let xdp = match &self.pin_dir {
            Some(dir) => pin(
                xdp_link,
                dir.join(format!("{}{mode}_{interface}", bpffs::XDP_LINK_PREFIX)),
            )?,
            None => xdp_link,
        };
        Ok(Attachment {
            interface: interface.to_owned(),
            mode: mode.to_owned(),
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

    fn pin_programs(&mut self, dir: &Path) -> Result<(), GuardError> {
        let pin_error = |path: &Path, source| GuardError::Pin {
            dir: path.to_owned(),
            source,
        };
        // An earlier daemon's programs, of either cookie mode: no longer attached anywhere.
        for name in [XDP_PROGRAM, XDP_OWN_COOKIES_PROGRAM, EGRESS_PROGRAM] {
            let path = dir.join(bpffs::program_pin(name));
            bpffs::remove_pin(&path).map_err(|err| pin_error(&path, err))?;
        }
        let mut pins: Vec<(&'static str, PathBuf)> = [self.xdp, EGRESS_PROGRAM]
            .into_iter()
            .map(|name| (name, dir.join(bpffs::program_pin(name))))
            .collect();
        // A netlink filter is recorded with a pin of its program (see crate::tc).
        if let Some(attachment) = &self.attachment
            && attachment.tc_mode == TcMode::Netlink
        {
            let marker =
                tc::marker(dir, &attachment.interface).map_err(|err| pin_error(dir, err))?;
            bpffs::remove_pin(&marker).map_err(|err| pin_error(&marker, err))?;
            pins.push((EGRESS_PROGRAM, marker));
        }
        for (name, path) in pins {
            let program = self
                .ebpf
                .program_mut(name)
                .ok_or(GuardError::MissingProgram(name))?;
            program
                .pin(&path)
                .map_err(|source| pin_error(&path, io::Error::other(source)))?;
        }
        Ok(())
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

    /// Every counter summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> Result<Counters, GuardError> {
        let counters: PerCpuArray<_, u64> = self.map(maps::COUNTERS)?;
        let mut totals = Counters::default();
        for counter in Counter::ALL {
            let per_cpu = counters
                .get(&counter.index(), 0)
                .map_err(map_error(maps::COUNTERS))?;
            totals.values[counter.index() as usize] = per_cpu.iter().sum();
        }
        Ok(totals)
    }

    /// Lifecycle events written to the ring and lost because it was full, since the maps were
    /// created.
    pub fn event_stats(&self) -> Result<(u64, u64), GuardError> {
        let stats: PerCpuArray<_, u64> = self.map(maps::EVENT_STATS)?;
        let sum = |index| {
            stats
                .get(&index, 0)
                .map(|values| values.iter().sum::<u64>())
                .map_err(map_error(maps::EVENT_STATS))
        };
        Ok((sum(EVENTS_SENT)?, sum(EVENTS_LOST)?))
    }

    /// The lifecycle ring, taken out of the guard to be polled.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, GuardError> {
        let map = self
            .ebpf
            .take_map(maps::EVENTS)
            .ok_or(GuardError::MissingMap(maps::EVENTS))?;
        RingBuf::try_from(map).map_err(map_error(maps::EVENTS))
    }

    /// The programs' rare-event ring (lines for the daemon's log), taken out to be polled.
    pub fn take_rare_events(&mut self) -> Result<RingBuf<MapData>, GuardError> {
        let map = self
            .ebpf
            .take_map(maps::RARE_EVENTS)
            .ok_or(GuardError::MissingMap(maps::RARE_EVENTS))?;
        RingBuf::try_from(map).map_err(map_error(maps::RARE_EVENTS))
    }

    /// The flow map, for reading last-seen times and removing finished connections.
    pub fn flows(&mut self) -> Result<FlowMap, GuardError> {
        let map = self
            .ebpf
            .take_map(maps::FLOWS)
            .ok_or(GuardError::MissingMap(maps::FLOWS))?;
        let capacity = map_capacity(&map);
        let map = HashMap::try_from(map).map_err(map_error(maps::FLOWS))?;
        Ok(FlowMap { map, capacity })
    }

    fn map<'a, T>(&'a self, name: &'static str) -> Result<T, GuardError>
    where
        T: TryFrom<&'a aya::maps::Map, Error = MapError>,
    {
        let map = self.ebpf.map(name).ok_or(GuardError::MissingMap(name))?;
        T::try_from(map).map_err(map_error(name))
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, GuardError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(GuardError::MissingMap(name))?;
        T::try_from(map).map_err(map_error(name))
    }
}

/// The tracked flows as the data plane keeps them.
pub struct FlowMap {
    map: HashMap<MapData, FlowKey, Flow>,
    capacity: u32,
}

impl FlowMap {
    pub fn get(&self, key: &FlowKey) -> Option<Flow> {
        self.map.get(key, 0).ok()
    }

    pub fn remove(&mut self, key: &FlowKey) {
        // Already gone (evicted by the LRU) is as good as removed.
        let _ = self.map.remove(key);
    }

    /// Every flow in the map, for a daemon that adopts an earlier one's.
    pub fn entries(&self) -> Vec<(FlowKey, Flow)> {
        self.map.iter().filter_map(Result::ok).collect()
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }
}

fn map_capacity(map: &aya::maps::Map) -> u32 {
    let data: Option<&MapData> = match map {
        aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data) => Some(data),
        _ => None,
    };
    data.and_then(|data| data.info().ok())
        .map_or(DEFAULT_FLOW_CAPACITY, |info| info.max_entries())
}

/// Links found pinned in a pin directory.
struct PinnedLinks {
    interface: String,
    mode: String,
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

/// The links an earlier daemon pinned in `dir`, if both are there.
fn pinned_links(dir: &Path) -> Result<Option<PinnedLinks>, GuardError> {
    let pin_error = |source| GuardError::Pin {
        dir: dir.to_owned(),
        source,
    };
    let entries = fs::read_dir(dir).map_err(pin_error)?;
    let netlink = tc::recorded(dir).map_err(pin_error)?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(bpffs::XDP_LINK_PREFIX) else {
            continue;
        };
        let Some((mode, interface)) = rest.split_once('_') else {
            continue;
        };
        let tcx = dir.join(format!("{}{interface}", bpffs::TC_LINK_PREFIX));
        let tc = if tcx.exists() {
            PinnedTc::Tcx(tcx)
        } else if netlink.iter().any(|(recorded, _)| recorded == interface) {
            PinnedTc::Netlink
        } else {
            continue;
        };
        return Ok(Some(PinnedLinks {
            interface: interface.to_owned(),
            mode: mode.to_owned(),
            xdp: entry.path(),
            tc,
        }));
    }
    Ok(None)
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, GuardError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(GuardError::MissingProgram(name))?
        .try_into()
        .map_err(|_| GuardError::ProgramType {
            name,
            expected: std::any::type_name::<T>()
                .rsplit("::")
                .next()
                .unwrap_or("?"),
        })
}

/// Why a program did not load, in a few lines: the error, and the last lines of the verifier's
/// log, which say why it refused. The whole log can run to a hundred thousand lines, more than
/// journald keeps from one burst.
pub fn rejection(error: &aya::programs::ProgramError) -> String {
    const LAST_LINES: usize = 25;
    match error {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LAST_LINES)..];
            format!(
                "{io_error}; the last {} of the verifier's {} log lines:\n{}",
                tail.len(),
                lines.len(),
                tail.join("\n")
            )
        }
        other => other.to_string(),
    }
}

fn verifier(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> GuardError {
    move |source| GuardError::Verifier { name, source }
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

/// `op`, tried again for a while when it fails with ENOMEM. An LPM trie takes its nodes from a
/// per-CPU cache the kernel refills in the background, and nodes freed by a removal come back
/// only after an RCU grace period: thousands of inserts in a row can find the cache empty for a
/// moment (seen on Linux 6.18 while the host was busy: one insert of a 16,001-prefix reload
/// failed with ENOMEM) although memory is there.
fn retry_enomem<T>(mut op: impl FnMut() -> Result<T, MapError>) -> Result<T, MapError> {
    const ATTEMPTS: u32 = 100;
    let mut attempt = 1;
    loop {
        match op() {
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::ENOMEM) && attempt < ATTEMPTS =>
            {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            outcome => return outcome,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Loading a program as the wrong type is a defect of the object, not something the
    /// verifier said: it must not pass for a rejection (which `cookie_mode = "auto"` answers by
    /// falling back to the kernel's cookies).
    #[test]
    fn a_program_of_another_type_is_not_a_verifier_rejection() {
        let mut ebpf = Ebpf::load(TCPGUARD_OBJECT).expect("loading the maps (needs root)");
        let Err(err) = program_mut::<Xdp>(&mut ebpf, EGRESS_PROGRAM) else {
            panic!("the egress program taken for XDP");
        };
        assert!(
            matches!(
                err,
                GuardError::ProgramType {
                    name: EGRESS_PROGRAM,
                    expected: "Xdp"
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "program \"tcpguard_egress\" in the eBPF object is not of the type tcpguard loads \
             it as (Xdp)"
        );
    }
}
