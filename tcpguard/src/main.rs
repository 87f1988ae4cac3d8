use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use log::error;
use tcpguard::{
    config::{self, Overrides},
    control::{self, Request},
    daemon::{self, ConfigSource},
    logging::{self, LevelSource},
};

#[derive(Parser)]
#[command(version, about = "Keeps TCP services reachable during SYN floods.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to an interface and protect ports until SIGINT or SIGTERM; SIGHUP reloads the
    /// configuration file.
    Run(RunArgs),
    /// Show what the running daemon protects and what it has seen.
    Status(StatusArgs),
    /// List the connections the running daemon tracks, with both ends' states.
    Flows(AskArgs),
    /// Check a configuration file. Exits 0 when it is valid, 1 when it does not name an
    /// interface and ports yet (the systemd unit's start is then skipped), 255 when it is
    /// invalid.
    CheckConfig {
        #[arg(long, value_name = "FILE", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Detach tcpguard from its interface and remove its pins. Only tcpguard's own pins on a
    /// BPF filesystem are removed; the directory goes when nothing else is left in it.
    Detach {
        /// The pin directory (pin_dir in the configuration).
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/tcpguard",
              value_parser = path_or_empty())]
        pin_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Configuration file [default: /etc/tcpguard/tcpguard.toml, if it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Interface whose incoming traffic is protected.
    #[arg(long = "iface", value_name = "IFACE")]
    interface: Option<String>,
    /// TCP port to protect (IPv4 and IPv6); repeat for several. Replaces the file's list.
    #[arg(long = "port", value_name = "PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    ports: Vec<u16>,
    /// auto: native (driver) XDP, falling back to generic; native; skb (generic).
    #[arg(long = "xdp-mode", value_name = "MODE")]
    xdp_mode: Option<String>,
    /// Refuse to start, rather than set them, when net.ipv4.tcp_syncookies or
    /// net.ipv4.tcp_timestamps is not 2 in this network namespace.
    #[arg(long)]
    keep_sysctls: bool,
    /// Leave the programs attached (pinned) on exit, for the next daemon to adopt.
    #[arg(long)]
    keep_attached: bool,
    /// Seconds between counter log lines (0: none).
    #[arg(long, value_name = "SECONDS")]
    stats_interval: Option<u64>,
    /// Address for /metrics and /healthz; empty: none.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics_address: Option<String>,
    /// Unix socket for `tcpguard status` and `flows`.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Where maps, programs and links are pinned (on a BPF filesystem); empty: not pinned
    /// (under `ip netns exec`, whose /sys has no BPF filesystem).
    #[arg(long, value_name = "DIR", value_parser = path_or_empty())]
    pin_dir: Option<PathBuf>,
    /// auto: tcpguard's own cookies where the kernel allows them (6.9+), the kernel's
    /// otherwise; own; kernel.
    #[arg(long = "cookie-mode", value_name = "MODE")]
    cookie_mode: Option<String>,
    /// error, warn, info, debug, trace or off; over RUST_LOG and the file's log_level.
    #[arg(long = "log-level", value_name = "LEVEL", value_parser = logging::parse_level)]
    log_level: Option<log::LevelFilter>,
    /// under-attack: cookies only while the SYN rate says an attack is on; always; auto:
    /// under-attack where the cookie path allows it (own cookies), always otherwise.
    #[arg(long, value_name = "WHEN")]
    cookies: Option<String>,
}

#[derive(clap::Args)]
struct AskArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    /// Print JSON, for scripts.
    #[arg(long)]
    json: bool,
}

/// A path, where an empty one is a value of its own (clap's path parser refuses it): an empty
/// pin directory means "not pinned".
fn path_or_empty() -> impl clap::builder::TypedValueParser<Value = PathBuf> {
    use clap::builder::TypedValueParser as _;
    clap::builder::OsStringValueParser::new().map(PathBuf::from)
}

#[derive(clap::Args)]
struct StatusArgs {
    #[command(flatten)]
    ask: AskArgs,
    /// Show, every SECONDS (default 2) until Ctrl-C, the per-second rates of the counters that
    /// moved and the connections by state.
    #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2",
          value_parser = watch_interval, conflicts_with = "json")]
    watch: Option<Duration>,
}

/// `--watch SECONDS`: from a tenth of a second to an hour.
fn watch_interval(text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.1..=3600.0).contains(&seconds) => Ok(Duration::from_secs_f64(seconds)),
        _ => Err(format!(
            "{text:?} is not a number of seconds from 0.1 to 3600"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let flag = match &cli.command {
        Command::Run(args) => args.log_level,
        _ => None,
    };
    let level_source = logging::init(flag);
    let result = match cli.command {
        Command::Run(args) => daemon::run(config_source(args, level_source)),
        Command::Status(StatusArgs {
            ask: args,
            watch: Some(interval),
        }) => tcpguard::watch::watch(&args.socket, interval),
        Command::Status(args) => ask(&args.ask, Request::Status),
        Command::Flows(args) => ask(&args, Request::Flows),
        Command::Detach { pin_dir } => detach(&pin_dir),
        Command::CheckConfig { config } => return check_config(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!("{err:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_source(args: RunArgs, level_source: LevelSource) -> ConfigSource {
    ConfigSource {
        level_source,
        required: args.config.is_some(),
        path: args
            .config
            .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH)),
        overrides: Overrides {
            interface: args.interface,
            ports: args.ports,
            xdp_mode: args.xdp_mode,
            keep_sysctls: args.keep_sysctls,
            keep_attached: args.keep_attached,
            stats_interval: args.stats_interval,
            metrics_listen: args.metrics_address,
            control_socket: args.control_socket,
            pin_dir: args.pin_dir,
            cookie_mode: args.cookie_mode,
            cookies: args.cookies,
        },
    }
}

fn ask(args: &AskArgs, request: Request) -> anyhow::Result<()> {
    let answer = control::ask(&args.socket, request)?;
    if args.json {
        print!("{answer}");
        return Ok(());
    }
    match request {
        Request::Status => print_status(&serde_json::from_str(&answer)?),
        Request::Flows => print_flows(&serde_json::from_str::<Vec<control::Flow>>(&answer)?),
    }
    Ok(())
}

fn print_status(status: &control::Status) {
    let ports: Vec<String> = status.ports.iter().map(u16::to_string).collect();
    println!(
        "tcpguard {} (pid {}) on {} in {} XDP mode{}, up {}",
        status.version,
        status.pid,
        status.interface,
        status.xdp_mode,
        if status.adopted { " (adopted)" } else { "" },
        duration_text(status.uptime_seconds as f64),
    );
    println!("protected ports: {}", ports.join(", "));
    println!(
        "TC egress: {} ({})",
        status.tc_attach, status.tc_attach_reason
    );
    println!(
        "SYN cookies: {} ({})",
        status.cookie_mode, status.cookie_mode_reason
    );
    println!(
        "cookies {} ({}); {}, {} SYN/s, {} attacks so far",
        status.cookies,
        status.cookies_reason,
        if status.under_attack {
            "UNDER ATTACK"
        } else {
            "no attack"
        },
        status.syn_rate,
        status.attacks
    );
    if !status.cookie_handovers.is_empty() {
        let handovers: Vec<String> = status
            .cookie_handovers
            .iter()
            .map(|(name, value)| format!("{value} {name}"))
            .collect();
        println!("cookie ACKs handed to the kernel: {}", handovers.join(", "));
    }
    println!(
        "connections: {} tracked, flow maps hold {} per family",
        status.tracked_connections, status.flow_capacity
    );
    for (states, count) in &status.connections_by_state {
        println!("  {count:>8}  {states}");
    }
    println!("packets:");
    for (name, value) in status.packets.iter().filter(|(_, value)| **value != 0) {
        println!("  {value:>12}  {name}");
    }
    println!(
        "lifecycle events: {} received, {} lost",
        status.events_sent, status.events_lost
    );
    if !status.allow.is_empty() {
        println!("allowed sources: {}", status.allow.join(", "));
    }
    if !status.deny.is_empty() {
        println!("denied sources: {}", status.deny.join(", "));
    }
    if status.max_connections_per_source != 0 {
        println!(
            "connections per source: at most {}",
            status.max_connections_per_source
        );
    }
}

fn print_flows(flows: &[control::Flow]) {
    println!(
        "{:<46} {:<46} {:<13} {:<13} {:<8} {:>9} {:>9}",
        "CLIENT", "SERVER", "CLIENT-STATE", "SERVER-STATE", "ORIGIN", "AGE", "IDLE"
    );
    for flow in flows {
        println!(
            "{:<46} {:<46} {:<13} {:<13} {:<8} {:>9} {:>9}",
            flow.client,
            flow.server,
            flow.client_state,
            flow.server_state,
            flow.origin,
            duration_text(flow.age_seconds),
            duration_text(flow.idle_seconds),
        );
    }
}

fn duration_text(seconds: f64) -> String {
    match seconds {
        s if s < 60.0 => format!("{s:.1}s"),
        s if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        s => format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        ),
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let loaded = config::Config::load(path, true, &Overrides::default())
        .and_then(|config| config.check_host().map(|()| config));
    match loaded {
        Ok(config) => {
            let ports: Vec<String> = config.reload.ports.iter().map(u16::to_string).collect();
            println!(
                "{}: protects TCP ports {} on {}",
                path.display(),
                ports.join(", "),
                config.restart.interface
            );
            ExitCode::SUCCESS
        }
        Err(err) if config::is_unconfigured(&err) => {
            println!("{}: nothing to do yet, {err}", path.display());
            ExitCode::from(1)
        }
        Err(err) => {
            error!("{err}");
            ExitCode::from(255)
        }
    }
}

fn detach(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    use tcpguard::bpffs::{self, PinDirError};
    if pin_dir.as_os_str().is_empty() {
        println!("nothing pinned: an empty pin directory means pinning is off");
        return Ok(());
    }
    if std::fs::symlink_metadata(pin_dir).is_err() {
        println!("nothing pinned under {}", pin_dir.display());
        return Ok(());
    }
    match bpffs::remove_pins(pin_dir) {
        Ok(foreign) if foreign.is_empty() => {
            println!("detached; removed {}", pin_dir.display());
            Ok(())
        }
        Ok(foreign) => {
            println!(
                "detached; removed tcpguard's pins from {} and left it with what is not tcpguard's: {}",
                pin_dir.display(),
                foreign.join(", ")
            );
            Ok(())
        }
        Err(PinDirError::NotBpffs { .. } | PinDirError::NotDirectory { .. }) => {
            anyhow::bail!(
                "refusing to touch {}: it is not a directory on a BPF filesystem, and `tcpguard detach` removes only tcpguard's own pins from one (pin_dir, such as /sys/fs/bpf/tcpguard)",
                pin_dir.display()
            )
        }
        Err(err) => Err(err.into()),
    }
}
