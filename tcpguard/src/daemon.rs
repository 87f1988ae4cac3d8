//! The daemon: loads and attaches the data plane, then one loop that reads lifecycle events,
//! keeps the connection table, reaps idle connections, refreshes metrics, answers the control
//! socket and reloads the configuration on SIGHUP.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    net::IpAddr,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use aya_log::EbpfLogger;
use log::{debug, error, info, warn};
use tcpguard_common::{
    AttackConfig, AttackState, Counter, FLOW_IPV4, FlowKey, LifecycleEvent, SourceKey,
    attack::{WINDOW_NS, WINDOWS_PER_S},
};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    Guard,
    config::{Config, CookieMode, Cookies, OnExit, Overrides},
    control::{self, Asked, Request},
    cookies::{self, KeyRing},
    guard::{Counters, FlowMap, GuardError, LoadOptions},
    http,
    logging::{self, LevelSource},
    metrics::Metrics,
    notify::notify,
    prefix::PrefixSet,
    reqsk::Reqsk,
    sysctl::{self, Outcome, TCP_SYNCOOKIES, TCP_TIMESTAMPS},
    tc,
    tracker::{Effect, Tracker},
};

/// Most events handled before the loop looks at its other duties.
const EVENT_BATCH: usize = 4096;

/// Where the configuration comes from, to read it again on SIGHUP.
pub struct ConfigSource {
    pub path: PathBuf,
    /// Whether the file must exist (it was named on the command line).
    pub required: bool,
    pub overrides: Overrides,
    /// Whether the file's `log_level` decides the level.
    pub level_source: LevelSource,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, crate::config::ConfigError> {
        Config::load(&self.path, self.required, &self.overrides)
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(source: ConfigSource) -> anyhow::Result<()> {
    let config = source.load()?;
    crate::kernel::check()?;
    logging::follow_config(source.level_source, config.reload.log_level);
    if crate::guard::if_index(&config.restart.interface).is_none() {
        anyhow::bail!(
            "interface {:?} does not exist; `ip link` lists the interfaces of this network namespace",
            config.restart.interface
        );
    }
    let tc_choice = tc::probe(&std::ffi::CString::new(config.restart.interface.as_str())?)
        .context("cannot ask the kernel whether it has TCX")?;
    let mut choice = cookies::choose(config.restart.cookie_mode)?;
    // Refused before anything is loaded.
    cookies::when(config.restart.cookies, &choice)?;
    // The sysctls first, so that a refusal comes before anything is loaded.
    if choice.own {
        // The host's TCP sysctls stay as they are; the kernel only has to take cookies at all.
        if sysctl::read(TCP_SYNCOOKIES.name)?[0] == 0 {
            return Err(cookies::CookieError::SyncookiesOff.into());
        }
    } else {
        kernel_cookie_sysctls(&config)?;
    }
    config.check_host()?;
    let load = |own_cookies| {
        Guard::load_with(&LoadOptions {
            pin_dir: config.restart.pin_dir.clone(),
            flow_capacity: config.restart.flow_capacity,
            own_cookies,
        })
    };
    let mut guard = match load(choice.own) {
        // "auto" takes the best path the kernel accepts: an older verifier may refuse the
        // own-cookie program that a newer one takes.
        Err(err @ GuardError::Verifier { .. })
            if choice.own && config.restart.cookie_mode == CookieMode::Auto =>
        {
            warn!("{err}");
            choice = cookies::Choice {
                own: false,
                reason: format!(
                    "cookie_mode = \"auto\" and kernel {} refused the own-cookie program",
                    cookies::kernel_release()
                ),
            };
            warn!(
                "falling back to the kernel's cookies because {}",
                choice.reason
            );
            kernel_cookie_sysctls(&config)?;
            load(false)?
        }
        loaded => loaded?,
    };
    let mut cookie = sysctl::syn_cookie_config()?;
    if choice.own {
        cookie.mss = sysctl::interface_mss(&config.restart.interface);
    }
    let mut keys = KeyRing::new(
        config.reload.cookie_secret_file.as_deref(),
        config.reload.cookie_key_rotation,
    )?;
    // Both go into this load's own port table before the program is attached; the MAC
    // first, so that set_ports writes it into every protected port's entry.
    let (mac, owned) = crate::host::read(&config.restart.interface)?;
    guard.set_interface_mac(mac)?;
    guard.set_ports(&config.reload.ports)?;
    guard.set_syn_cookie_config(cookie)?;
    guard.set_policy(&config.reload.policy)?;
    if choice.own {
        refresh_keys(&mut guard, &mut keys)?;
    }
    let when = cookies::when(config.restart.cookies, &choice)?;
    guard.set_attack_config(attack_config(&config, when.0))?;
    guard.set_host_addresses(&owned)?;
    info!(
        "answering SYNs to this host's own addresses only: {}",
        owned
            .iter()
            .map(crate::host::display)
            .collect::<Vec<_>>()
            .join(", ")
    );
    // The TC program that turns an accepted own-cookie ACK into a socket goes first: an ACK
    // XDP accepts before it is there would draw a RST.
    let reqsk = if choice.own {
        let mut reqsk = Reqsk::load(config.restart.pin_dir.as_deref())?;
        reqsk.attach(&config.restart.interface)?;
        Some(reqsk)
    } else {
        None
    };
    let attachment = guard.attach(
        &config.restart.interface,
        config.restart.xdp_mode,
        tc_choice.mode,
    )?;
    let tc_reason = if attachment.tc_mode == tc_choice.mode {
        tc_choice.reason
    } else {
        format!(
            "the previous daemon attached it so, though {}",
            tc_choice.reason
        )
    };
    // Logged once the daemon answers on its sockets too, as READY=1 is sent: tests and
    // operators may take it as the sign that everything is up.
    let protecting = format!(
        "protecting TCP ports {:?} on {} in {} mode, TC egress through {} because {}{}, with {} cookies because {}{} (SYN-ACK window scale {}, SACK {}); {}",
        config.reload.ports,
        attachment.interface,
        attachment.mode,
        attachment.tc_mode,
        tc_reason,
        if attachment.adopted {
            ", adopted from the previous daemon"
        } else {
            ""
        },
        if choice.own { "own" } else { "the kernel's" },
        choice.reason,
        match (choice.own, keys.shared()) {
            (false, _) => "",
            (true, true) => ", key shared through cookie_secret_file",
            (true, false) => ", key of this host's own",
        },
        cookie.window_scale,
        if cookie.sack != 0 { "on" } else { "off" },
        match when.0 {
            Cookies::UnderAttack => format!(
                "cookies only under attack ({} SYN/s or more; over after {} s below half that), because {}",
                config.restart.attack.syn_rate,
                config.restart.attack.end_after.as_secs(),
                when.1
            ),
            Cookies::Always => format!("cookies for every SYN because {}", when.1),
        },
    );
    let events = guard.take_events()?;
    let flows = guard.flows()?;
    let data_plane_log = guard.take_log(logging::DataPlane)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the event loop")?;
    let mut daemon = Daemon::new(source, config, guard, flows, choice, keys);
    daemon.reqsk = reqsk;
    daemon.when = when;
    daemon.tc_reason = tc_reason;
    let outcome = runtime.block_on(daemon.serve(events, data_plane_log, &protecting));
    daemon.stop()?;
    outcome
}

struct Daemon {
    source: ConfigSource,
    config: Config,
    guard: Option<Guard>,
    flows: FlowMap,
    /// The deny list in force. The data plane checks it on untracked segments only; the daemon
    /// removes the flows of denied clients, so that their segments are judged, and dropped.
    denied: PrefixSet,
    tracker: Tracker,
    metrics: Metrics,
    started: Instant,
    sources_full: HashSet<SourceKey>,
    effects: Vec<Effect>,
    heartbeat: http::Heartbeat,
    /// Counters at the last stats log line.
    logged: Counters,
    cookies: cookies::Choice,
    keys: KeyRing,
    /// The TC ingress program of the own-cookie path.
    reqsk: Option<Reqsk>,
    /// When SYNs get cookies, and why.
    when: (Cookies, String),
    /// The attack state as last reported.
    attack: AttackState,
    /// Whether this daemon made the control socket (and so removes it when it stops).
    control_socket_bound: bool,
    /// Why the TC egress program is attached the way it is.
    tc_reason: String,
}

/// The data plane's [`AttackConfig`] for `config` when cookies are sent `when`.
fn attack_config(config: &Config, when: Cookies) -> AttackConfig {
    AttackConfig {
        only_under_attack: u32::from(when == Cookies::UnderAttack),
        calm_windows: (config.restart.attack.end_after.as_secs() * WINDOWS_PER_S) as u32,
        start_rate: config.restart.attack.syn_rate,
    }
}

/// What the kernel's cookies need: `tcp_syncookies=2` and `tcp_timestamps=2`, set (and said so)
/// or, with `keep_sysctls`, refused.
fn kernel_cookie_sysctls(config: &Config) -> anyhow::Result<()> {
    for required in [TCP_SYNCOOKIES, TCP_TIMESTAMPS] {
        if let Outcome::Changed { from } = required.ensure(!config.restart.keep_sysctls)? {
            info!(
                "set {} from {from} to {} (the kernel's SYN cookies from XDP need it)",
                required.name, required.required
            );
        }
    }
    Ok(())
}

/// Writes the own cookie's keys when they are missing or due to change. Errors never show a
/// key.
fn refresh_keys(guard: &mut Guard, keys: &mut KeyRing) -> anyhow::Result<()> {
    let held = guard.cookie_secrets()?;
    if let Some(new) = keys.update(&held, cookies::tai_now_s())? {
        guard.set_cookie_secrets(&new)?;
        if held.generation != 0 {
            info!("cookie key generation {} in use", new.generation);
        }
    }
    Ok(())
}

impl Daemon {
    fn new(
        source: ConfigSource,
        config: Config,
        guard: Guard,
        flows: FlowMap,
        cookies: cookies::Choice,
        keys: KeyRing,
    ) -> Self {
        let start_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        let logged = guard.counters().unwrap_or_default();
        let mut daemon = Self {
            tracker: Tracker::new(
                config.reload.timeouts,
                config.reload.max_connections_per_source,
            ),
            source,
            denied: PrefixSet::new(&config.reload.policy.deny),
            config,
            guard: Some(guard),
            flows,
            metrics: Metrics::new(start_time, if cookies.own { "own" } else { "kernel" }),
            started: Instant::now(),
            sources_full: HashSet::new(),
            effects: Vec::new(),
            heartbeat: Arc::new(AtomicU64::new(crate::clock::monotonic_secs())),
            logged,
            cookies,
            keys,
            reqsk: None,
            when: (Cookies::Always, String::new()),
            attack: AttackState::default(),
            control_socket_bound: false,
            tc_reason: String::new(),
        };
        let adopted = daemon.flows.entries();
        if !adopted.is_empty() {
            info!(
                "adopting {} tracked connections from the flow maps",
                adopted.len()
            );
        }
        for (key, flow) in adopted {
            daemon
                .tracker
                .adopt(key, flow.last_seen_ns, &mut daemon.effects);
        }
        daemon.apply_effects();
        daemon.untrack_denied();
        daemon
    }

    /// Removes the flows of denied clients from the flow maps: the deny list changed, or a
    /// daemon adopted an earlier one's flows. Their segments then take the untracked path,
    /// which drops them (`denied_source`); their connections end in the table when idle.
    fn untrack_denied(&mut self) {
        if self.denied.is_empty() {
            return;
        }
        let mut removed = 0;
        for (key, _) in self.flows.entries() {
            if self.is_denied(&key) {
                self.untrack(&key);
                removed += 1;
            }
        }
        if removed > 0 {
            info!("{removed} tracked connections of denied sources are cut");
        }
    }

    /// Removes the flow `key` from the flow maps; its connection stays in the table.
    fn untrack(&mut self, key: &FlowKey) {
        self.flows.remove(key);
        self.tracker.untrack(key);
    }

    fn is_denied(&self, key: &FlowKey) -> bool {
        self.denied.contains(ip(key.family, key.client_addr))
    }

    fn guard(&mut self) -> &mut Guard {
        self.guard.as_mut().expect("the guard lives until stop")
    }

    async fn serve(
        &mut self,
        events: RingBuf<MapData>,
        data_plane_log: EbpfLogger<logging::DataPlane>,
        protecting: &str,
    ) -> anyhow::Result<()> {
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut hangup = signal(SignalKind::hangup()).context("cannot watch SIGHUP")?;
        // SAFETY: the ring owns its map's file descriptor, which stays open and the same for
        // as long as the ring lives, and the ring lives inside the AsyncFd.
        let mut ring =
            unsafe { AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) }
                .map_err(|err| anyhow::anyhow!("cannot poll the lifecycle ring buffer: {err}"))?;
        logging::forward_data_plane_log(data_plane_log)
            .context("cannot poll the data plane's aya-log ring buffer")?;
        if let Some(reqsk) = &mut self.reqsk {
            logging::forward_rare_events(reqsk.take_rare_events()?)
                .context("cannot poll the TC ingress program's rare-event ring buffer")?;
        }
        let (asked_tx, mut asked) = mpsc::channel::<Asked>(16);
        self.start_control_socket(asked_tx)?;
        if let Some(address) = self.config.restart.metrics_listen {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot serve metrics on {address}"))?;
            info!("metrics on http://{address}/metrics");
            tokio::spawn(http::serve(
                listener,
                self.metrics.registry(),
                self.heartbeat.clone(),
            ));
        }
        self.refresh_metrics();
        info!("{protecting}");
        notify(&format!(
            "READY=1\nSTATUS=protecting ports {:?} on {}",
            self.config.reload.ports, self.config.restart.interface
        ))
        .unwrap_or_else(|err| warn!("cannot tell systemd we are ready: {err}"));

        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last_log = Instant::now();
        loop {
            tokio::select! {
                _ = interrupt.recv() => { info!("SIGINT received, stopping"); break }
                _ = terminate.recv() => { info!("SIGTERM received, stopping"); break }
                _ = hangup.recv() => self.reload(),
                readable = ring.readable_mut() => {
                    let mut ready = readable.context("polling the lifecycle ring buffer")?;
                    if self.drain_events(ready.get_inner_mut()) < EVENT_BATCH {
                        ready.clear_ready();
                    }
                }
                Some((request, reply)) = asked.recv() => {
                    let _ = reply.send(self.answer(request));
                }
                _ = tick.tick() => {
                    self.heartbeat.store(crate::clock::monotonic_secs(), Ordering::Relaxed);
                    self.expire();
                    self.follow_host_addresses();
                    self.rotate_keys();
                    self.watch_attack();
                    self.refresh_metrics();
                    let interval = self.config.reload.stats_interval;
                    if !interval.is_zero() && last_log.elapsed() >= interval {
                        last_log = Instant::now();
                        self.log_stats(interval);
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads the data plane's attack state as it stands now, and says when an attack starts or
    /// ends.
    fn watch_attack(&mut self) {
        let state = match self.guard().attack_state() {
            Ok(state) => state,
            Err(err) => {
                warn!("cannot read the attack state: {err}");
                return;
            }
        };
        let config = attack_config(&self.config, self.when.0);
        let now = state.at(crate::clock::monotonic_coarse_ns() / WINDOW_NS, &config);
        match (self.attack.active != 0, now.active != 0) {
            (false, true) => warn!(
                "SYN flood: {} SYN/s to protected ports (from {} SYN/s on is an attack){}",
                now.change_rate,
                config.start_rate,
                if self.when.0 == Cookies::UnderAttack {
                    "; answering SYNs with cookies"
                } else {
                    ""
                }
            ),
            (true, false) => info!(
                "SYN flood over: below {} SYN/s for {} s (now {} SYN/s){}",
                config.end_rate(),
                self.config.restart.attack.end_after.as_secs(),
                now.rate,
                if self.when.0 == Cookies::UnderAttack {
                    "; SYNs go to the kernel again"
                } else {
                    ""
                }
            ),
            _ => {}
        }
        self.metrics.observe_attack(&now);
        self.attack = now;
    }

    fn rotate_keys(&mut self) {
        if !self.cookies.own {
            return;
        }
        let guard = self.guard.as_mut().expect("the guard lives until stop");
        if let Err(err) = refresh_keys(guard, &mut self.keys) {
            warn!("cannot update the cookie keys, the current ones stay: {err:#}");
        }
    }

    /// Keeps the data plane's view of the host current: addresses that come and go (DHCP,
    /// a VIP moved by keepalived, a container's address) and the interface's MAC. Read once a
    /// second; until an address is seen, SYNs to it go to the kernel unanswered, which is
    /// what the host would do without tcpguard.
    fn follow_host_addresses(&mut self) {
        let interface = self.config.restart.interface.clone();
        let update = crate::host::read(&interface)
            .map_err(anyhow::Error::from)
            .and_then(|(mac, owned)| {
                let guard = self.guard();
                guard.set_interface_mac(mac)?;
                Ok(guard.set_host_addresses(&owned)?)
            });
        match update {
            Ok((added, removed)) => {
                for address in &added {
                    info!(
                        "host address {} appeared; SYNs to it are answered",
                        crate::host::display(address)
                    );
                }
                for address in &removed {
                    info!(
                        "host address {} went away; SYNs to it go to the kernel",
                        crate::host::display(address)
                    );
                }
            }
            Err(err) => warn!("cannot follow this host's addresses: {err:#}"),
        }
    }

    /// Handles up to [`EVENT_BATCH`] events; returns how many there were.
    fn drain_events(&mut self, ring: &mut RingBuf<MapData>) -> usize {
        let mut handled = 0;
        while handled < EVENT_BATCH {
            let Some(item) = ring.next() else { break };
            if item.len() >= size_of::<LifecycleEvent>() {
                // SAFETY: the record is a LifecycleEvent written by the data plane; the
                // length was checked, and read_unaligned copes with any alignment.
                let event = unsafe { item.as_ptr().cast::<LifecycleEvent>().read_unaligned() };
                if let Err(unknown) = self.tracker.on_event(&event, &mut self.effects) {
                    self.metrics.observe_unknown_event();
                    debug!("{unknown}");
                }
                // A flow the data plane started under the deny list before a change that
                // denies its client: the sweep at the change may have missed it.
                if self.is_denied(&event.key) {
                    self.untrack(&event.key);
                }
            }
            handled += 1;
        }
        self.apply_effects();
        handled
    }

    fn expire(&mut self) {
        let now = crate::clock::monotonic_ns();
        let flows = &self.flows;
        self.tracker.expire(
            now,
            |key| flows.get(key).map(|flow| flow.last_seen_ns),
            &mut self.effects,
        );
        self.apply_effects();
    }

    fn apply_effects(&mut self) {
        // Taken out while self is borrowed below, put back empty to keep its allocation.
        let mut effects = std::mem::take(&mut self.effects);
        for effect in &effects {
            self.metrics.observe_effect(effect);
            match effect {
                Effect::Closed {
                    key, forget: true, ..
                }
                | Effect::Untracked { key } => self.flows.remove(key),
                Effect::SourceFull { source, full } => {
                    if *full {
                        self.sources_full.insert(*source);
                    } else {
                        self.sources_full.remove(source);
                    }
                    if let Err(err) = self.guard().set_source_full(source, *full) {
                        warn!("cannot update the per-source limit: {err}");
                    }
                }
                Effect::Closed { forget: false, .. }
                | Effect::Opened { .. }
                | Effect::Handshake { .. } => {}
            }
        }
        effects.clear();
        self.effects = effects;
    }

    fn refresh_metrics(&mut self) {
        let guard = self.guard.as_ref().expect("the guard lives until stop");
        match (guard.counters(), guard.event_stats()) {
            (Ok(counters), Ok(events)) => self.metrics.observe_data_plane(&counters, events),
            (Err(err), _) | (_, Err(err)) => warn!("cannot read the data plane's counters: {err}"),
        }
        if let Some(reqsk) = &self.reqsk {
            match reqsk.results() {
                Ok(results) => self.metrics.observe_handovers(results),
                Err(err) => warn!("cannot read the TC ingress program's counters: {err}"),
            }
        }
        self.metrics.observe_table(
            &self.tracker.count_by_state(),
            self.tracker.in_flow_maps(),
            self.flows.capacity(),
            self.sources_full.len(),
        );
    }

    fn log_stats(&mut self, interval: Duration) {
        let Ok(now) = self.guard().counters() else {
            return;
        };
        let delta = now.since(&self.logged);
        if delta.nonzero().next().is_some() {
            info!(
                "last {}s: {}; {} connections tracked",
                interval.as_secs(),
                format_counters(&delta, "+"),
                self.tracker.len()
            );
        }
        self.logged = now;
    }

    fn reload(&mut self) {
        notify("RELOADING=1").ok();
        let result = self
            .source
            .load()
            .map_err(anyhow::Error::from)
            .and_then(|new| {
                self.apply_config(new)?;
                Ok(())
            });
        match result {
            Ok(()) => {
                info!(
                    "configuration reloaded: ports {:?}, {} allowed and {} denied prefixes, {} connections per source",
                    self.config.reload.ports,
                    self.config.reload.policy.allow.len(),
                    self.config.reload.policy.deny.len(),
                    limit_text(self.config.reload.max_connections_per_source),
                );
                self.metrics.observe_reload(true);
            }
            Err(err) => {
                error!("configuration not reloaded, the running one stays: {err:#}");
                self.metrics.observe_reload(false);
            }
        }
        notify("READY=1").ok();
    }

    fn apply_config(&mut self, mut new: Config) -> anyhow::Result<()> {
        if new.restart != self.config.restart {
            for (name, old, wanted) in self.config.restart.changes(&new.restart) {
                warn!(
                    "{name} changed from {old} to {wanted}; that takes a restart, the running value stays"
                );
            }
            new.restart = self.config.restart.clone();
        }
        // Everything that can fail is prepared first, beside what is in force; then the
        // data plane is switched, and a failed switch puts back what was switched already.
        // A changed or rewritten secret file takes effect at once; a bad one keeps the keys.
        let keys = KeyRing::new(
            new.reload.cookie_secret_file.as_deref(),
            new.reload.cookie_key_rotation,
        )?;
        let old_ports = self.config.reload.ports.clone();
        let guard = self.guard();
        let policy = guard.prepare_policy(&new.reload.policy)?;
        guard.set_ports(&new.reload.ports)?;
        if let Err(err) = guard.commit_policy(policy) {
            guard.set_ports(&old_ports)?;
            return Err(err.into());
        }
        self.denied = PrefixSet::new(&new.reload.policy.deny);
        self.untrack_denied();
        if !new.reload.policy.source_limit {
            self.sources_full.clear();
        }
        self.tracker.reconfigure(
            new.reload.timeouts,
            new.reload.max_connections_per_source,
            &mut self.effects,
        );
        self.apply_effects();
        logging::follow_config(self.source.level_source, new.reload.log_level);
        self.config = new;
        self.keys = keys;
        self.rotate_keys();
        Ok(())
    }

    fn start_control_socket(&mut self, asked: mpsc::Sender<Asked>) -> anyhow::Result<()> {
        let path = &self.config.restart.control_socket;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| {
                format!("cannot create {} for the control socket", dir.display())
            })?;
        }
        replace_stale_socket(path)?;
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o660))
            .with_context(|| format!("cannot set the permissions of {}", path.display()))?;
        self.control_socket_bound = true;
        tokio::spawn(control::serve(listener, asked));
        Ok(())
    }

    fn answer(&self, request: Request) -> String {
        match request {
            Request::Status => serde_json::to_string(&self.status()),
            Request::Flows => serde_json::to_string(&self.flow_list()),
        }
        .unwrap_or_else(|err| format!("{{\"error\":\"{err}\"}}"))
    }

    fn status(&self) -> control::Status {
        let guard = self.guard.as_ref().expect("the guard lives until stop");
        let attachment = guard.attachment();
        let counters = guard.counters().unwrap_or_default();
        let (events_sent, events_lost) = guard.event_stats().unwrap_or_default();
        let connections_by_state: BTreeMap<String, usize> = self
            .tracker
            .count_by_state()
            .into_iter()
            .map(|((client, server), count)| (format!("{client}/{server}"), count))
            .collect();
        control::Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            interface: self.config.restart.interface.clone(),
            xdp_mode: attachment.map(|a| a.mode.to_string()).unwrap_or_default(),
            adopted: attachment.is_some_and(|a| a.adopted),
            tc_attach: attachment
                .map(|a| a.tc_mode.to_string())
                .unwrap_or_default(),
            tc_attach_reason: self.tc_reason.clone(),
            ports: self.config.reload.ports.iter().copied().collect(),
            uptime_seconds: self.started.elapsed().as_secs(),
            tracked_connections: self.tracker.len(),
            flow_capacity: self.flows.capacity(),
            connections_by_state,
            packets: Counter::ALL
                .iter()
                .map(|&counter| (counter.name().to_owned(), counters.get(counter)))
                .collect(),
            events_sent,
            events_lost,
            allow: self
                .config
                .reload
                .policy
                .allow
                .iter()
                .map(ToString::to_string)
                .collect(),
            deny: self
                .config
                .reload
                .policy
                .deny
                .iter()
                .map(ToString::to_string)
                .collect(),
            max_connections_per_source: self.config.reload.max_connections_per_source,
            cookie_mode: if self.cookies.own { "own" } else { "kernel" }.to_owned(),
            cookie_mode_reason: self.cookies.reason.clone(),
            cookies: self.when.0.to_string(),
            cookies_reason: self.when.1.clone(),
            under_attack: self.attack.active != 0,
            syn_rate: self.attack.rate,
            attacks: self.attack.started,
            cookie_handovers: self
                .reqsk
                .as_ref()
                .and_then(|reqsk| reqsk.results().ok())
                .map(|results| {
                    results
                        .by_name()
                        .into_iter()
                        .map(|(name, value)| (name.to_owned(), value))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn flow_list(&self) -> Vec<control::Flow> {
        let now = crate::clock::monotonic_ns();
        let mut list: Vec<control::Flow> = self
            .tracker
            .iter()
            .map(|(key, tracked)| {
                let connection = &tracked.connection;
                let last_seen = self
                    .flows
                    .get(key)
                    .map_or(connection.last_activity_ns, |flow| {
                        flow.last_seen_ns.max(connection.last_activity_ns)
                    });
                control::Flow {
                    client: endpoint(key, true),
                    server: endpoint(key, false),
                    client_state: connection.client.state.to_string(),
                    server_state: connection.server.state.to_string(),
                    origin: tracked.origin.label().to_owned(),
                    age_seconds: now.saturating_sub(connection.opened_ns) as f64 / 1e9,
                    idle_seconds: now.saturating_sub(last_seen) as f64 / 1e9,
                }
            })
            .collect();
        list.sort_by(|a, b| (&a.server, &a.client).cmp(&(&b.server, &b.client)));
        list
    }

    /// Logs the totals, tells systemd, and detaches or leaves the programs attached.
    fn stop(&mut self) -> anyhow::Result<()> {
        notify("STOPPING=1").ok();
        // Only the socket this daemon made: one it refused to replace stays.
        if self.control_socket_bound && is_socket(&self.config.restart.control_socket) {
            let _ = fs::remove_file(&self.config.restart.control_socket);
        }
        let Some(guard) = self.guard.take() else {
            return Ok(());
        };
        if let Ok(totals) = guard.counters() {
            info!("totals: {}", format_counters(&totals, ""));
        }
        match self.config.reload.on_exit {
            OnExit::Keep => {
                if let Some(reqsk) = self.reqsk.take() {
                    reqsk.release()?;
                }
                guard.release()?;
                info!(
                    "left attached to {} through {}; `tcpguard detach` removes it",
                    self.config.restart.interface,
                    self.config
                        .restart
                        .pin_dir
                        .as_deref()
                        .unwrap_or(Path::new("?"))
                        .display()
                );
            }
            OnExit::Detach => {
                if let Some(reqsk) = self.reqsk.take() {
                    reqsk.detach()?;
                }
                guard.detach()?;
                info!("detached from {}", self.config.restart.interface);
            }
        }
        Ok(())
    }
}

fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket())
}

/// Makes room for the control socket at `path`: nothing is there, or a socket nobody answers
/// on (left by a daemon that was killed), which is removed. A live socket, or anything that is
/// not a socket, is refused and left as it is.
fn replace_stale_socket(path: &Path) -> anyhow::Result<()> {
    match fs::symlink_metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => anyhow::bail!("cannot look at {}: {err}", path.display()),
        Ok(meta) if !meta.file_type().is_socket() => anyhow::bail!(
            "control.socket {} exists and is not a socket; tcpguard replaces only a stale socket there, so move it away or set control.socket to another path",
            path.display()
        ),
        Ok(_) => {}
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => anyhow::bail!(
            "another process (another tcpguard?) answers on {}; stop it first or set control.socket",
            path.display()
        ),
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display())),
        Err(err) => anyhow::bail!(
            "cannot tell whether {} is in use ({err}); remove it or set control.socket",
            path.display()
        ),
    }
}

pub(crate) fn endpoint(key: &FlowKey, client: bool) -> String {
    let (address, port) = if client {
        (key.client_addr, key.client_port)
    } else {
        (key.server_addr, key.server_port)
    };
    std::net::SocketAddr::new(ip(key.family, address), port).to_string()
}

/// An address field of a [`FlowKey`] of `family`.
fn ip(family: u8, address: [u8; 16]) -> IpAddr {
    if family == FLOW_IPV4 {
        IpAddr::from([address[0], address[1], address[2], address[3]])
    } else {
        IpAddr::from(address)
    }
}

fn limit_text(limit: u32) -> String {
    if limit == 0 {
        "unlimited".to_owned()
    } else {
        limit.to_string()
    }
}

pub fn format_counters(counters: &Counters, sign: &str) -> String {
    let parts: Vec<String> = counters
        .nonzero()
        .map(|(counter, value)| format!("{}={sign}{value}", counter.name()))
        .collect();
    if parts.is_empty() {
        "no packets".to_owned()
    } else {
        parts.join(" ")
    }
}
