//! What the daemon writes into the data plane's maps (ports, policy tries, cookie and attack
//! configuration, the host's addresses, full sources) and reads back (counters, the flow map,
//! the event rings).

use std::{collections::BTreeSet, net::IpAddr};

use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf, lpm_trie::Key};
use aya_log::EbpfLogger;
use tcpguard_common::{
    AttackConfig, AttackState, Counter, DEFAULT_FLOW_CAPACITY, EVENTS_LOST, EVENTS_SENT,
    FAMILY_IPV4, FAMILY_IPV6, FLOW_IPV4, Flow, FlowKey, FlowKeyV4, HostAddress, HostFilter,
    POLICY_ALLOW, POLICY_DENY, POLICY_SLOT, POLICY_SOURCE_LIMIT, PORT_COUNT, Policy, PortTable,
    ProtectedPort, SourceKey, SynCookieConfig, cookie::CookieSecrets, maps,
};

use super::{Guard, GuardError};
use crate::{config::SourcePolicy, prefix::Prefix};

/// The protected-port table that protects exactly `ports`, for both families, on the interface
/// whose MAC is `interface_mac`.
fn port_table(ports: &BTreeSet<u16>, interface_mac: [u8; 6]) -> Box<PortTable> {
    let mut table: Box<PortTable> = vec![ProtectedPort::UNPROTECTED; PORT_COUNT as usize]
        .into_boxed_slice()
        .try_into()
        .expect("PORT_COUNT entries");
    for &port in ports {
        table[usize::from(port)] = ProtectedPort {
            families: FAMILY_IPV4 | FAMILY_IPV6,
            _pad: 0,
            interface_mac,
        };
    }
    table
}

/// Allow and deny lists written into the slot of tries not in force, with the
/// [`Policy::lists`] byte that puts them in force ([`Guard::commit_policy`]).
#[must_use = "a prepared policy takes effect only when committed"]
#[derive(Debug)]
pub struct PreparedPolicy {
    lists: u8,
}

impl Guard {
    /// Protects exactly `ports`, for IPv4 and IPv6, on the interface MAC last set
    /// ([`Guard::set_interface_mac`]). The table is written whole, in one map update of
    /// 512 KiB: when the write fails, nothing changes. The kernel copies it in place, so a
    /// packet on another CPU during the copy (75 µs in `bench xdp`) may meet some entries
    /// old and some new, as with any map write; entries that do not change never differ.
    /// A reload that keeps the ports writes nothing.
    pub fn set_ports(&mut self, ports: &BTreeSet<u16>) -> Result<(), GuardError> {
        if *ports == self.ports {
            return Ok(());
        }
        self.write_port_table(ports, self.interface_mac)?;
        self.ports = ports.clone();
        Ok(())
    }

    fn write_port_table(
        &mut self,
        ports: &BTreeSet<u16>,
        interface_mac: [u8; 6],
    ) -> Result<(), GuardError> {
        let table = port_table(ports, interface_mac);
        let mut map: Array<_, PortTable> = self.map_mut(maps::PROTECTED_PORTS)?;
        map.set(0, &*table, 0)
            .map_err(map_error(maps::PROTECTED_PORTS))
    }

    pub fn set_syn_cookie_config(&mut self, config: SynCookieConfig) -> Result<(), GuardError> {
        self.set_single(maps::SYN_COOKIE_CONFIG, &config)
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
        self.set_single(
            maps::POLICY,
            &Policy {
                lists: prepared.lists,
                _pad: [0; 7],
            },
        )?;
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
        self.single(maps::POLICY)
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
        self.single(maps::COOKIE_SECRETS)
    }

    pub fn set_cookie_secrets(&mut self, secrets: &CookieSecrets) -> Result<(), GuardError> {
        self.set_single(maps::COOKIE_SECRETS, secrets)
    }

    /// Tells the data plane when SYNs get cookies.
    pub fn set_attack_config(&mut self, config: AttackConfig) -> Result<(), GuardError> {
        self.set_single(maps::ATTACK_CONFIG, &config)
    }

    /// The SYN rate and attack state as the data plane last left them.
    pub fn attack_state(&self) -> Result<AttackState, GuardError> {
        self.single(maps::ATTACK)
    }

    /// Tells the data plane the protected interface's MAC: each protected port's entry holds
    /// it ([`ProtectedPort::interface_mac`]), and the table is written again when it changes.
    /// When the write fails, the MAC is not taken as set, and the next call writes it again;
    /// until then, frames to the new MAC pass untouched, as frames for another host do. With
    /// no port protected yet (at start), no entry holds it and nothing is written.
    pub fn set_interface_mac(&mut self, mac: [u8; 6]) -> Result<(), GuardError> {
        if mac == self.interface_mac {
            return Ok(());
        }
        if !self.ports.is_empty() {
            let ports = self.ports.clone();
            self.write_port_table(&ports, mac)?;
        }
        self.interface_mac = mac;
        Ok(())
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
        self.set_single(maps::HOST_ADDRESS_FILTER, &HostFilter::of(addresses))?;
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
        self.take_ring(maps::EVENTS)
    }

    /// The programs' aya-log ring, taken out with a reader that hands each line to `logger`.
    pub fn take_log<L: log::Log>(&mut self, logger: L) -> Result<EbpfLogger<L>, GuardError> {
        EbpfLogger::init_with_logger(&mut self.ebpf, logger).map_err(|error| match error {
            aya_log::Error::MapNotFound => GuardError::MissingMap(maps::AYA_LOGS),
            other => GuardError::Log(other),
        })
    }

    /// The flow maps, for reading last-seen times and removing finished connections.
    pub fn flows(&mut self) -> Result<FlowMap, GuardError> {
        let (v4, capacity) = self.take_flow_map(maps::FLOWS_V4)?;
        let (v6, _) = self.take_flow_map(maps::FLOWS_V6)?;
        Ok(FlowMap { v4, v6, capacity })
    }

    /// The flow map `name`, taken out of the guard, and its capacity.
    fn take_flow_map<K: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<(HashMap<MapData, K, Flow>, u32), GuardError> {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(GuardError::MissingMap(name))?;
        let capacity = map_capacity(&map);
        let map = HashMap::try_from(map).map_err(map_error(name))?;
        Ok((map, capacity))
    }

    /// The value of `name`, a map of one entry (configuration or state the data plane keeps
    /// in an array of one).
    fn single<T: aya::Pod>(&self, name: &'static str) -> Result<T, GuardError> {
        let map: Array<_, T> = self.map(name)?;
        map.get(&0, 0).map_err(map_error(name))
    }

    /// Writes `value` into `name`, a map of one entry.
    fn set_single<T: aya::Pod>(&mut self, name: &'static str, value: &T) -> Result<(), GuardError> {
        let mut map: Array<_, T> = self.map_mut(name)?;
        map.set(0, value, 0).map_err(map_error(name))
    }

    /// The ring buffer `name`, taken out of the guard to be polled.
    fn take_ring(&mut self, name: &'static str) -> Result<RingBuf<MapData>, GuardError> {
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(GuardError::MissingMap(name))?;
        RingBuf::try_from(map).map_err(map_error(name))
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
/// The data plane's tracked connections: one map per family, each of the same capacity.
pub struct FlowMap {
    v4: HashMap<MapData, FlowKeyV4, Flow>,
    v6: HashMap<MapData, FlowKey, Flow>,
    capacity: u32,
}

impl FlowMap {
    pub fn get(&self, key: &FlowKey) -> Option<Flow> {
        if key.family == FLOW_IPV4 {
            self.v4.get(&key.v4(), 0).ok()
        } else {
            self.v6.get(key, 0).ok()
        }
    }

    pub fn remove(&mut self, key: &FlowKey) {
        // Already gone (evicted by the LRU) is as good as removed.
        let _ = if key.family == FLOW_IPV4 {
            self.v4.remove(&key.v4())
        } else {
            self.v6.remove(key)
        };
    }

    /// Every flow in the maps, for a daemon that adopts an earlier one's.
    pub fn entries(&self) -> Vec<(FlowKey, Flow)> {
        let v4 = self
            .v4
            .iter()
            .filter_map(Result::ok)
            .map(|(key, flow)| (FlowKey::from(key), flow));
        v4.chain(self.v6.iter().filter_map(Result::ok)).collect()
    }

    /// Connections each family's map holds before it evicts the least recently active.
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
