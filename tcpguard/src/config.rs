//! The configuration file (TOML), the command-line flags that override it, and the checks every
//! value passes before the daemon uses it.

use std::{
    collections::BTreeSet,
    fs,
    io::{self, Read as _},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{bpffs, connection::Timeouts, prefix::Prefix};

/// Where the daemon looks for its configuration unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/tcpguard/tcpguard.toml";

/// The largest configuration file read: room for full allow and deny lists (16,384 prefixes
/// per family each), with comments.
pub const MAX_FILE_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not a configuration file: it is larger than {} MiB (or endless, like a device)",
        MAX_FILE_BYTES >> 20
    )]
    TooLarge { path: PathBuf },
    #[error("{path} is not a configuration file: it is not UTF-8 text")]
    NotText { path: PathBuf },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("no {0} to protect: set `{0}` in the config file or pass --{1}")]
    Unconfigured(&'static str, &'static str),
}

/// Whether `error` only says that the interface or the ports are not set yet: the state of a
/// freshly installed package.
pub fn is_unconfigured(error: &ConfigError) -> bool {
    matches!(error, ConfigError::Unconfigured(..))
}

/// What happens to the attachment when the daemon stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExit {
    /// Detach and remove everything pinned: the interface is as it was before.
    #[default]
    Detach,
    /// Leave the programs attached through their pinned links, so that protection goes on
    /// while the daemon restarts; `tcpguard detach` removes them.
    Keep,
}

/// The configuration file as written. Every key is optional; unknown keys are refused.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct File {
    pub interface: Option<String>,
    pub ports: Vec<u32>,
    pub xdp_mode: String,
    pub keep_sysctls: bool,
    pub on_exit: OnExit,
    pub stats_interval: u64,
    pub pin_dir: PathBuf,
    pub flow_capacity: u32,
    pub cookie_mode: String,
    pub cookie_secret_file: PathBuf,
    pub cookie_key_rotation: u64,
    pub log_level: String,
    /// "auto", "always" or "under-attack".
    pub cookies: String,
    pub attack: AttackSection,
    pub metrics: MetricsSection,
    pub control: ControlSection,
    pub policy: PolicySection,
    pub timeouts: TimeoutsSection,
}

impl Default for File {
    fn default() -> Self {
        Self {
            interface: None,
            ports: Vec::new(),
            xdp_mode: "auto".to_owned(),
            keep_sysctls: false,
            on_exit: OnExit::Detach,
            stats_interval: 60,
            pin_dir: PathBuf::from("/sys/fs/bpf/tcpguard"),
            flow_capacity: tcpguard_common::DEFAULT_FLOW_CAPACITY,
            cookie_mode: "auto".to_owned(),
            cookie_secret_file: PathBuf::new(),
            cookie_key_rotation: DEFAULT_KEY_ROTATION_SECS,
            log_level: "info".to_owned(),
            cookies: "auto".to_owned(),
            attack: AttackSection::default(),
            metrics: MetricsSection::default(),
            control: ControlSection::default(),
            policy: PolicySection::default(),
            timeouts: TimeoutsSection::default(),
        }
    }
}

/// When SYNs get cookies under `cookies = "under-attack"`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AttackSection {
    /// SYN/s to protected ports from which an attack starts.
    pub syn_rate: u64,
    /// Seconds in a row below half `syn_rate` after which it ends.
    pub end_after: u64,
}

impl Default for AttackSection {
    fn default() -> Self {
        Self {
            syn_rate: 10_000,
            end_after: 10,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Address of the HTTP endpoint serving /metrics and /healthz; empty: none.
    pub listen: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9877".to_owned(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    /// Unix socket that `tcpguard status` and `tcpguard flows` ask.
    pub socket: PathBuf,
}

impl Default for ControlSection {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
        }
    }
}

/// Where `tcpguard status` and `flows` look for the daemon unless told otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/tcpguard/control.sock";

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// Sources that skip the cookie round trip.
    pub allow: Vec<Prefix>,
    /// Sources dropped in XDP. A source in both lists is denied.
    pub deny: Vec<Prefix>,
    /// Tracked connections a single source address may have; 0: no limit.
    pub max_connections_per_source: u32,
}

/// Timeouts in seconds.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsSection {
    pub syn_sent: u64,
    pub syn_received: u64,
    pub established: u64,
    pub fin_wait: u64,
    pub close_wait: u64,
    pub closing: u64,
    pub last_ack: u64,
    pub msl: u64,
    pub close: u64,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        let defaults = Timeouts::default();
        Self {
            syn_sent: defaults.syn_sent.as_secs(),
            syn_received: defaults.syn_received.as_secs(),
            established: defaults.established.as_secs(),
            fin_wait: defaults.fin_wait.as_secs(),
            close_wait: defaults.close_wait.as_secs(),
            closing: defaults.closing.as_secs(),
            last_ack: defaults.last_ack.as_secs(),
            msl: defaults.msl.as_secs(),
            close: defaults.close.as_secs(),
        }
    }
}

/// Command-line flags that override the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub interface: Option<String>,
    pub ports: Vec<u16>,
    pub xdp_mode: Option<String>,
    pub keep_sysctls: bool,
    pub keep_attached: bool,
    pub stats_interval: Option<u64>,
    pub metrics_listen: Option<String>,
    pub control_socket: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub cookie_mode: Option<String>,
    pub cookies: Option<String>,
}

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

impl std::str::FromStr for AttachMode {
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

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Skb => "skb",
        })
    }
}

/// Source policy as the XDP program applies it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    pub allow: Vec<Prefix>,
    pub deny: Vec<Prefix>,
    /// Whether a per-source connection limit is in force (the daemon keeps the counts).
    pub source_limit: bool,
}

/// When SYNs to protected ports are answered with cookies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Cookies {
    /// Only while an attack is on; otherwise the kernel's normal handshake. The default, where
    /// the cookie path allows it (own cookies).
    #[default]
    UnderAttack,
    /// Every SYN, all the time.
    Always,
}

impl std::str::FromStr for Cookies {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "under-attack" => Ok(Self::UnderAttack),
            "always" => Ok(Self::Always),
            other => Err(format!(
                "cookies {other:?} is not one of auto, under-attack, always"
            )),
        }
    }
}

impl std::fmt::Display for Cookies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::UnderAttack => "under-attack",
            Self::Always => "always",
        })
    }
}

/// What starts and ends an attack (see `tcpguard_common::attack`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attack {
    pub syn_rate: u64,
    pub end_after: Duration,
}

const ATTACK_RATE_RANGE: std::ops::RangeInclusive<u64> = 10..=100_000_000;
const ATTACK_END_RANGE: std::ops::RangeInclusive<u64> = 1..=3600;

/// Which SYN cookies tcpguard answers with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CookieMode {
    /// Own cookies where the kernel has `bpf_sk_assign_tcp_reqsk` (6.9 and later), the
    /// kernel's otherwise.
    #[default]
    Auto,
    /// tcpguard's own cookie; the kernel builds the socket through `bpf_sk_assign_tcp_reqsk`.
    Own,
    /// The kernel's cookie through the listener-mode helpers (`tcp_syncookies=2`,
    /// `tcp_timestamps=2`).
    Kernel,
}

impl std::str::FromStr for CookieMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(Self::Auto),
            "own" => Ok(Self::Own),
            "kernel" => Ok(Self::Kernel),
            other => Err(format!(
                "cookie_mode {other:?} is not one of auto, own, kernel"
            )),
        }
    }
}

impl std::fmt::Display for CookieMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Own => "own",
            Self::Kernel => "kernel",
        })
    }
}

/// How often the own cookie's key changes unless configured: hourly.
pub const DEFAULT_KEY_ROTATION_SECS: u64 = 3600;
/// Rotation can be no quicker than a cookie's lifetime: two keys are held, and the one a
/// rotation overwrites must have no live cookies left.
const KEY_ROTATION_RANGE: std::ops::RangeInclusive<u64> =
    tcpguard_common::cookie::COOKIE_LIFETIME_S..=MAX_TIMEOUT_SECS;

/// The configuration the daemon runs with: every value checked, in two parts: what is set up
/// once at start, and what a reload (SIGHUP) puts in force.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub restart: RestartSettings,
    pub reload: ReloadSettings,
}

/// The settings that take a restart: what is loaded, attached and listened on at start, and
/// the cookie path chosen then. A reload that changes one says so and keeps the running value.
/// This is the one list of them.
#[derive(Clone, Debug, PartialEq)]
pub struct RestartSettings {
    pub interface: String,
    pub xdp_mode: AttachMode,
    pub pin_dir: Option<PathBuf>,
    pub flow_capacity: u32,
    pub cookie_mode: CookieMode,
    /// `None`: "auto", under attack where the cookie path allows it, else always.
    pub cookies: Option<Cookies>,
    pub attack: Attack,
    pub metrics_listen: Option<SocketAddr>,
    pub control_socket: PathBuf,
    /// Read once, when the sysctls the kernel's cookies need are checked at start.
    pub keep_sysctls: bool,
}

/// The settings a reload puts in force.
#[derive(Clone, Debug, PartialEq)]
pub struct ReloadSettings {
    pub ports: BTreeSet<u16>,
    pub policy: SourcePolicy,
    pub max_connections_per_source: u32,
    pub timeouts: Timeouts,
    pub stats_interval: Duration,
    /// The daemon's log level, the data plane's lines included, unless `--log-level` or
    /// `RUST_LOG` says otherwise (see [`crate::logging`]).
    pub log_level: log::LevelFilter,
    /// A secret shared by the hosts behind one address, so that each accepts the others'
    /// cookies; `None`: a random key of this host's own.
    pub cookie_secret_file: Option<PathBuf>,
    pub cookie_key_rotation: Duration,
    /// Read when the daemon stops.
    pub on_exit: OnExit,
}

impl RestartSettings {
    /// Every setting with its name (as in the file) and its value, for telling the operator.
    pub fn named(&self) -> Vec<(&'static str, String)> {
        // Taken apart field by field, so that a setting added to the struct and not here does
        // not compile.
        let Self {
            interface,
            xdp_mode,
            pin_dir,
            flow_capacity,
            cookie_mode,
            cookies,
            attack,
            metrics_listen,
            control_socket,
            keep_sysctls,
        } = self;
        // As the file spells them: strings quoted, "" for no pinning or no metrics endpoint.
        let quoted = |text: &dyn std::fmt::Display| format!("\"{text}\"");
        vec![
            ("interface", quoted(interface)),
            ("xdp_mode", quoted(xdp_mode)),
            (
                "pin_dir",
                quoted(&pin_dir.as_deref().unwrap_or(Path::new("")).display()),
            ),
            ("flow_capacity", flow_capacity.to_string()),
            ("cookie_mode", quoted(cookie_mode)),
            (
                "cookies",
                cookies
                    .as_ref()
                    .map_or(quoted(&"auto"), |cookies| quoted(cookies)),
            ),
            (
                "attack",
                format!(
                    "syn_rate {}, end_after {} s",
                    attack.syn_rate,
                    attack.end_after.as_secs()
                ),
            ),
            (
                "metrics.listen",
                metrics_listen.map_or(quoted(&""), |listen| quoted(&listen)),
            ),
            ("control.socket", quoted(&control_socket.display())),
            ("keep_sysctls", keep_sysctls.to_string()),
        ]
    }

    /// The settings `wanted` changes: each one's name, running value and wanted value.
    pub fn changes(&self, wanted: &Self) -> Vec<(&'static str, String, String)> {
        self.named()
            .into_iter()
            .zip(wanted.named())
            .filter(|((_, old), (_, new))| old != new)
            .map(|((name, old), (_, new))| (name, old, new))
            .collect()
    }
}

/// The longest timeout accepted: 30 days.
const MAX_TIMEOUT_SECS: u64 = 30 * 24 * 3600;
const FLOW_CAPACITY_RANGE: std::ops::RangeInclusive<u32> = 1024..=(1 << 24);

impl Config {
    /// Reads `path` (a missing file is an empty one only when `required` is false), applies
    /// `overrides`, and checks the result.
    pub fn load(path: &Path, required: bool, overrides: &Overrides) -> Result<Self, ConfigError> {
        let file = match read(path) {
            Ok(text) => parse(path, &text)?,
            Err(ConfigError::Read { source, .. })
                if source.kind() == io::ErrorKind::NotFound && !required =>
            {
                File::default()
            }
            Err(err) => return Err(err),
        };
        Self::from_file(file, overrides)
    }

    /// Checks what depends on this host rather than on the file: that the pin directory is
    /// one tcpguard may pin in. `tcpguard run` and `tcpguard check-config` both ask, so that
    /// what one refuses the other refuses too.
    pub fn check_host(&self) -> Result<(), ConfigError> {
        match &self.restart.pin_dir {
            Some(dir) => bpffs::check_pin_dir(dir).map_err(|err| invalid(err.to_string())),
            None => Ok(()),
        }
    }

    pub fn from_file(mut file: File, overrides: &Overrides) -> Result<Self, ConfigError> {
        if let Some(interface) = &overrides.interface {
            file.interface = Some(interface.clone());
        }
        if !overrides.ports.is_empty() {
            file.ports = overrides
                .ports
                .iter()
                .map(|&port| u32::from(port))
                .collect();
        }
        if let Some(mode) = &overrides.xdp_mode {
            file.xdp_mode = mode.clone();
        }
        file.keep_sysctls |= overrides.keep_sysctls;
        if overrides.keep_attached {
            file.on_exit = OnExit::Keep;
        }
        if let Some(seconds) = overrides.stats_interval {
            file.stats_interval = seconds;
        }
        if let Some(listen) = &overrides.metrics_listen {
            file.metrics.listen = listen.clone();
        }
        if let Some(socket) = &overrides.control_socket {
            file.control.socket = socket.clone();
        }
        if let Some(dir) = &overrides.pin_dir {
            file.pin_dir = dir.clone();
        }
        if let Some(mode) = &overrides.cookie_mode {
            file.cookie_mode = mode.clone();
        }
        if let Some(cookies) = &overrides.cookies {
            file.cookies = cookies.clone();
        }
        validate(file)
    }
}

/// The file's text, refused when it is larger than [`MAX_FILE_BYTES`]: at most that much is
/// ever read, so `/dev/zero` or `/dev/urandom` named by mistake ends in an error, not in
/// exhausted memory.
fn read(path: &Path) -> Result<String, ConfigError> {
    let read_error = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let mut bytes = Vec::new();
    fs::File::open(path)
        .map_err(read_error)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
        });
    }
    String::from_utf8(bytes).map_err(|_| ConfigError::NotText {
        path: path.to_owned(),
    })
}

fn parse(path: &Path, text: &str) -> Result<File, ConfigError> {
    toml::from_str(text).map_err(|err| ConfigError::Parse {
        path: path.to_owned(),
        message: err.to_string().trim_end().replace('\n', " "),
    })
}

fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid(message)
}

fn validate(file: File) -> Result<Config, ConfigError> {
    let interface = file
        .interface
        .filter(|name| !name.is_empty())
        .ok_or(ConfigError::Unconfigured("interface", "iface"))?;
    if !is_interface_name(&interface) {
        return Err(invalid(format!(
            "interface {interface:?} is not a name an interface can have (1 to 15 bytes, no '/', ':' or white space, not \".\" or \"..\")"
        )));
    }
    if file.ports.is_empty() {
        return Err(ConfigError::Unconfigured("ports", "port"));
    }
    let mut ports = BTreeSet::new();
    for port in file.ports {
        match u16::try_from(port) {
            Ok(port) if port != 0 => ports.insert(port),
            _ => {
                return Err(invalid(format!(
                    "port {port} is not a TCP port number from 1 to 65535"
                )));
            }
        };
    }
    let xdp_mode = file.xdp_mode.parse::<AttachMode>().map_err(invalid)?;
    for (name, list) in [
        ("policy.allow", &file.policy.allow),
        ("policy.deny", &file.policy.deny),
    ] {
        check_fits(name, list)?;
    }
    if !FLOW_CAPACITY_RANGE.contains(&file.flow_capacity) {
        return Err(invalid(format!(
            "flow_capacity {} is not between {} and {}",
            file.flow_capacity,
            FLOW_CAPACITY_RANGE.start(),
            FLOW_CAPACITY_RANGE.end()
        )));
    }
    let cookie_mode = file.cookie_mode.parse::<CookieMode>().map_err(invalid)?;
    let cookie_secret_file = match file.cookie_secret_file.as_os_str().is_empty() {
        true => None,
        false if file.cookie_secret_file.is_absolute() => Some(file.cookie_secret_file),
        false => {
            return Err(invalid(format!(
                "cookie_secret_file {:?} is not an absolute path (empty: a random key of this host's own)",
                file.cookie_secret_file
            )));
        }
    };
    if !KEY_ROTATION_RANGE.contains(&file.cookie_key_rotation) {
        return Err(invalid(format!(
            "cookie_key_rotation = {} is not a number of seconds from {} to {}",
            file.cookie_key_rotation,
            KEY_ROTATION_RANGE.start(),
            KEY_ROTATION_RANGE.end()
        )));
    }
    let log_level = crate::logging::parse_level(&file.log_level)
        .map_err(|message| invalid(format!("log_level: {message}")))?;
    let cookies = match file.cookies.as_str() {
        "auto" => None,
        other => Some(other.parse::<Cookies>().map_err(invalid)?),
    };
    if !ATTACK_RATE_RANGE.contains(&file.attack.syn_rate) {
        return Err(invalid(format!(
            "attack.syn_rate = {} is not a number of SYNs a second from {} to {}",
            file.attack.syn_rate,
            ATTACK_RATE_RANGE.start(),
            ATTACK_RATE_RANGE.end()
        )));
    }
    if !ATTACK_END_RANGE.contains(&file.attack.end_after) {
        return Err(invalid(format!(
            "attack.end_after = {} is not a number of seconds from {} to {}",
            file.attack.end_after,
            ATTACK_END_RANGE.start(),
            ATTACK_END_RANGE.end()
        )));
    }
    let metrics_listen = match file.metrics.listen.as_str() {
        "" => None,
        text => Some(text.parse::<SocketAddr>().map_err(|_| {
            invalid(format!(
                "metrics.listen {text:?} is not an address and port such as 127.0.0.1:9877 or [::1]:9877 (empty turns the endpoint off)"
            ))
        })?),
    };
    if file.control.socket.as_os_str().is_empty() || !file.control.socket.is_absolute() {
        return Err(invalid(format!(
            "control.socket {:?} is not an absolute path",
            file.control.socket
        )));
    }
    let pin_dir = match file.pin_dir.as_os_str().is_empty() {
        true => None,
        false if file.pin_dir.is_absolute() => Some(file.pin_dir),
        false => {
            return Err(invalid(format!(
                "pin_dir {:?} is not an absolute path (empty turns pinning off)",
                file.pin_dir
            )));
        }
    };
    if file.on_exit == OnExit::Keep && pin_dir.is_none() {
        return Err(invalid(
            "on_exit = \"keep\" needs a pin_dir to keep the programs attached through".to_owned(),
        ));
    }
    let t = &file.timeouts;
    let seconds = |name: &str, value: u64| {
        if (1..=MAX_TIMEOUT_SECS).contains(&value) {
            Ok(Duration::from_secs(value))
        } else {
            Err(invalid(format!(
                "timeouts.{name} = {value} is not a number of seconds from 1 to {MAX_TIMEOUT_SECS}"
            )))
        }
    };
    let timeouts = Timeouts {
        syn_sent: seconds("syn_sent", t.syn_sent)?,
        syn_received: seconds("syn_received", t.syn_received)?,
        established: seconds("established", t.established)?,
        fin_wait: seconds("fin_wait", t.fin_wait)?,
        close_wait: seconds("close_wait", t.close_wait)?,
        closing: seconds("closing", t.closing)?,
        last_ack: seconds("last_ack", t.last_ack)?,
        msl: seconds("msl", t.msl)?,
        close: seconds("close", t.close)?,
    };
    Ok(Config {
        restart: RestartSettings {
            interface,
            xdp_mode,
            pin_dir,
            flow_capacity: file.flow_capacity,
            cookie_mode,
            cookies,
            attack: Attack {
                syn_rate: file.attack.syn_rate,
                end_after: Duration::from_secs(file.attack.end_after),
            },
            metrics_listen,
            control_socket: file.control.socket,
            keep_sysctls: file.keep_sysctls,
        },
        reload: ReloadSettings {
            ports,
            policy: SourcePolicy {
                allow: file.policy.allow,
                deny: file.policy.deny,
                source_limit: file.policy.max_connections_per_source > 0,
            },
            max_connections_per_source: file.policy.max_connections_per_source,
            timeouts,
            stats_interval: Duration::from_secs(file.stats_interval),
            log_level,
            cookie_secret_file,
            cookie_key_rotation: Duration::from_secs(file.cookie_key_rotation),
            on_exit: file.on_exit,
        },
    })
}

/// The kernel's rule for a network device's name (`dev_valid_name`): 1 to 15 bytes, no '/',
/// ':' or white space (the kernel's `isspace`, which counts 0xA0 too), and neither "." nor
/// "..".
fn is_interface_name(name: &str) -> bool {
    let forbidden = |byte: u8| {
        matches!(
            byte,
            0 | b'/' | b':' | b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0xa0
        )
    };
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.bytes().any(forbidden)
}

/// Whether the distinct prefixes of `list` fit the data plane's tries, one per family.
fn check_fits(name: &str, list: &[Prefix]) -> Result<(), ConfigError> {
    let capacity = tcpguard_common::POLICY_CAPACITY as usize;
    let distinct: std::collections::HashSet<&Prefix> = list.iter().collect();
    for (family, is_family) in [
        ("IPv4", IpAddr::is_ipv4 as fn(&IpAddr) -> bool),
        ("IPv6", IpAddr::is_ipv6),
    ] {
        let count = distinct
            .iter()
            .filter(|prefix| is_family(&prefix.address))
            .count();
        if count > capacity {
            return Err(invalid(format!(
                "{name} holds {count} distinct {family} prefixes; it holds at most {capacity} per family"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Result<Config, ConfigError> {
        Config::from_file(parse(Path::new("test.toml"), text)?, &Overrides::default())
    }

    fn error(text: &str) -> String {
        config(text).unwrap_err().to_string()
    }

    #[test]
    fn the_shipped_example_protects_nothing_and_documents_every_key() {
        let text = include_str!("../../systemd/tcpguard.toml");
        let example: File = parse(Path::new("tcpguard.toml"), text).unwrap();
        assert_eq!(example.on_exit, OnExit::Keep);
        let err = Config::from_file(example, &Overrides::default()).unwrap_err();
        assert!(is_unconfigured(&err), "{err}");
        // "## " starts prose; "# " an example value.
        let uncommented: String = text
            .lines()
            .filter(|line| !line.starts_with("##"))
            .map(|line| line.strip_prefix("# ").unwrap_or(line))
            .collect::<Vec<_>>()
            .join("\n");
        let every_key: File = parse(Path::new("tcpguard.toml"), &uncommented)
            .expect("the example with every value uncommented is still a valid file");
        Config::from_file(every_key.clone(), &Overrides::default()).unwrap();
        let defaults = File {
            interface: every_key.interface.clone(),
            ports: every_key.ports.clone(),
            on_exit: OnExit::Keep,
            policy: every_key.policy.clone(),
            ..File::default()
        };
        assert_eq!(every_key, defaults, "the example shows the defaults");
    }

    #[test]
    fn defaults_follow_the_kernel_and_conntrack() {
        let config = config("interface = \"eth0\"\nports = [80, 443, 80]").unwrap();
        assert_eq!(config.reload.ports, BTreeSet::from([80, 443]));
        assert_eq!(config.reload.timeouts, Timeouts::default());
        assert_eq!(
            config
                .reload
                .timeouts
                .of(crate::tcp_state::TcpState::TimeWait)
                .as_secs(),
            60
        );
        assert_eq!(
            config.restart.metrics_listen,
            Some("127.0.0.1:9877".parse().unwrap())
        );
        assert_eq!(config.reload.on_exit, OnExit::Detach);
        assert!(!config.reload.policy.source_limit);
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse(
            Path::new("t"),
            "interface = \"eth0\"\nports = [80]\nxdp_mode = \"native\"",
        )
        .unwrap();
        let overrides = Overrides {
            interface: Some("eth1".into()),
            ports: vec![8080],
            xdp_mode: Some("skb".into()),
            keep_attached: true,
            ..Overrides::default()
        };
        let config = Config::from_file(file, &overrides).unwrap();
        assert_eq!(config.restart.interface, "eth1");
        assert_eq!(config.reload.ports, BTreeSet::from([8080]));
        assert_eq!(config.restart.xdp_mode, AttachMode::Skb);
        assert_eq!(config.reload.on_exit, OnExit::Keep);
    }

    /// Each setting changed alone, as a reload would read it: every restart-only one is
    /// reported by its name, and nothing else is; a reloadable one changes `reload` only.
    #[test]
    fn a_reload_tells_restart_only_settings_from_reloadable_ones() {
        // The running file, with `change`'s key set as it says.
        let with = |change: &str| {
            let base = ["interface = \"eth0\"", "ports = [80]"]
                .into_iter()
                .filter(|line| !change.starts_with(&line[..line.find('=').unwrap()]))
                .collect::<Vec<_>>()
                .join("\n");
            config(&format!("{base}\n{change}")).unwrap()
        };
        let running = with("");
        let restart_only = [
            ("interface = \"eth1\"", "interface"),
            ("xdp_mode = \"skb\"", "xdp_mode"),
            ("pin_dir = \"/sys/fs/bpf/elsewhere\"", "pin_dir"),
            ("flow_capacity = 2048", "flow_capacity"),
            ("cookie_mode = \"kernel\"", "cookie_mode"),
            ("cookies = \"always\"", "cookies"),
            ("[attack]\nsyn_rate = 500", "attack"),
            ("[metrics]\nlisten = \"127.0.0.1:9999\"", "metrics.listen"),
            (
                "[control]\nsocket = \"/run/elsewhere.sock\"",
                "control.socket",
            ),
            ("keep_sysctls = true", "keep_sysctls"),
        ];
        // The cases cover the list.
        let mut covered: Vec<&str> = restart_only.iter().map(|(_, name)| *name).collect();
        let mut listed: Vec<&str> = running
            .restart
            .named()
            .iter()
            .map(|(name, _)| *name)
            .collect();
        covered.sort_unstable();
        listed.sort_unstable();
        assert_eq!(covered, listed);
        for (change, name) in restart_only {
            let wanted = with(change);
            let changes = running.restart.changes(&wanted.restart);
            let names: Vec<&str> = changes.iter().map(|(name, _, _)| *name).collect();
            assert_eq!(names, [name], "{change:?}");
            assert_eq!(wanted.reload, running.reload, "{change:?}");
        }
        for change in [
            "ports = [80, 443]",
            "on_exit = \"keep\"",
            "stats_interval = 5",
            "cookie_secret_file = \"/etc/tcpguard/secret\"",
            "cookie_key_rotation = 7200",
            "log_level = \"debug\"",
            "[policy]\ndeny = [\"10.0.0.0/8\"]",
            "[policy]\nmax_connections_per_source = 5",
            "[timeouts]\nmsl = 10",
        ] {
            let wanted = with(change);
            assert_eq!(wanted.restart, running.restart, "{change:?}");
            assert!(running.restart.changes(&wanted.restart).is_empty());
            assert_ne!(wanted.reload, running.reload, "{change:?}");
        }
    }

    #[test]
    fn every_bad_value_is_named() {
        let base = "interface = \"eth0\"\nports = [80]\n";
        for (extra, expected) in [
            ("colour = 1", "unknown field `colour`"),
            ("[policy]\nmax_conns = 3", "unknown field `max_conns`"),
            (
                "flow_capacity = 10",
                "flow_capacity 10 is not between 1024 and 16777216",
            ),
            (
                "xdp_mode = \"fast\"",
                "XDP mode \"fast\" is not one of auto, native, skb",
            ),
            (
                "[metrics]\nlisten = \"localhost\"",
                "metrics.listen \"localhost\" is not an address",
            ),
            (
                "[timeouts]\nmsl = 0",
                "timeouts.msl = 0 is not a number of seconds",
            ),
            (
                "[policy]\ndeny = [\"10.1.2.3/8\"]",
                "has host bits set; the prefix is 10.0.0.0/8",
            ),
            (
                "log_level = \"loud\"",
                "log_level: log level \"loud\" is not one of error, warn, info, debug, trace, off",
            ),
            (
                "pin_dir = \"bpf\"",
                "pin_dir \"bpf\" is not an absolute path",
            ),
            (
                "pin_dir = \"\"\non_exit = \"keep\"",
                "on_exit = \"keep\" needs a pin_dir",
            ),
        ] {
            let message = error(&format!("{base}{extra}"));
            assert!(message.contains(expected), "{extra:?}: {message}");
        }
        assert!(error("ports = [80]").contains("no interface to protect"));
        assert!(error("interface = \"eth0\"").contains("no ports to protect"));
        assert!(
            error("interface = \"eth0\"\nports = [70000]")
                .contains("port 70000 is not a TCP port number from 1 to 65535")
        );
    }

    #[test]
    fn interface_names_follow_the_kernels_rule() {
        for name in ["eth0", "enp0s31f6", "veth-a.b_c", "fifteen-bytes-x", "wlö0"] {
            assert!(is_interface_name(name), "{name:?}");
        }
        for name in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "a\u{b}b",
            "a\u{a0}b",
            "sixteen-bytes-xx",
        ] {
            assert!(!is_interface_name(name), "{name:?}");
        }
    }

    #[test]
    fn a_list_holds_at_most_the_tries_capacity_per_family() {
        let capacity = tcpguard_common::POLICY_CAPACITY;
        let v4 = |n: u32| Prefix {
            address: IpAddr::V4(n.into()),
            length: 32,
        };
        let v6 = |n: u32| Prefix {
            address: IpAddr::V6(u128::from(n).into()),
            length: 128,
        };
        let mut full: Vec<Prefix> = (0..capacity).map(v4).chain((0..capacity).map(v6)).collect();
        // Repeats are one entry in a trie.
        full.push(v4(0));
        check_fits("policy.allow", &full).unwrap();
        full.push(v6(capacity));
        let err = check_fits("policy.allow", &full).unwrap_err().to_string();
        assert_eq!(
            err,
            "policy.allow holds 16385 distinct IPv6 prefixes; it holds at most 16384 per family"
        );
    }

    #[test]
    fn a_missing_default_file_is_empty_but_a_named_one_is_an_error() {
        let missing = Path::new("/nonexistent/tcpguard.toml");
        let overrides = Overrides {
            interface: Some("lo".into()),
            ports: vec![80],
            ..Overrides::default()
        };
        assert!(Config::load(missing, false, &overrides).is_ok());
        let err = Config::load(missing, true, &overrides)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot read /nonexistent/tcpguard.toml"),
            "{err}"
        );
    }
}
