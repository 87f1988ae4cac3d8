use std::{io::Write as _, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use log::error;
use tcpguard::{
    config::{self, Overrides},
    control::{self, Request},
    daemon::{self, ConfigSource},
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
    Status(AskArgs),
    /// List the connections the running daemon tracks, with both ends' states.
    Flows(AskArgs),
    /// Check a configuration file. Exits 0 when it is valid, 1 when it does not name an
    /// interface and ports yet (the systemd unit's start is then skipped), 255 when it is
    /// invalid.
    CheckConfig {
        #[arg(long, value_name = "FILE", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Detach tcpguard from its interface and remove everything it pinned.
    Detach {
        /// The pin directory (pin_dir in the configuration).
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/tcpguard")]
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
    /// Where maps, programs and links are pinned (on a BPF filesystem); empty: not pinned.
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<PathBuf>,
    /// auto: tcpguard's own cookies where the kernel allows them (6.9+), the kernel's
    /// otherwise; own; kernel.
    #[arg(long = "cookie-mode", value_name = "MODE")]
    cookie_mode: Option<String>,
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

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => daemon::run(config_source(args)),
        Command::Status(args) => ask(&args, Request::Status),
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

/// Plain lines; under systemd (JOURNAL_STREAM set) without a timestamp, since journald adds its
/// own.
fn init_logging() {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format(|out, record| writeln!(out, "{}: {}", record.level(), record.args()));
    }
    builder.init();
}

fn config_source(args: RunArgs) -> ConfigSource {
    ConfigSource {
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
    if !status.cookie_handovers.is_empty() {
        let handovers: Vec<String> = status
            .cookie_handovers
            .iter()
            .map(|(name, value)| format!("{value} {name}"))
            .collect();
        println!("cookie ACKs handed to the kernel: {}", handovers.join(", "));
    }
    println!(
        "connections: {} tracked, flow table holds {}",
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
    match config::Config::load(path, true, &Overrides::default()) {
        Ok(config) => {
            let ports: Vec<String> = config.ports.iter().map(u16::to_string).collect();
            println!(
                "{}: protects TCP ports {} on {}",
                path.display(),
                ports.join(", "),
                config.interface
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
    if !pin_dir.exists() {
        println!("nothing pinned under {}", pin_dir.display());
        return Ok(());
    }
    tcpguard::bpffs::remove_pins(pin_dir)
        .map_err(|err| anyhow::anyhow!("cannot remove {}: {err}", pin_dir.display()))?;
    println!("detached; removed {}", pin_dir.display());
    Ok(())
}
