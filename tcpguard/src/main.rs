use std::{collections::BTreeSet, io::Write as _, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use log::{error, info};
use tcpguard::{
    AttachMode, Counters, Guard,
    sysctl::{self, Outcome, TCP_SYNCOOKIES, TCP_TIMESTAMPS},
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(version, about = "Keeps TCP services reachable during SYN floods.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to an interface and protect ports until SIGINT or SIGTERM.
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Interface whose incoming traffic is protected.
    #[arg(long = "iface", value_name = "IFACE")]
    interface: String,
    /// TCP port to protect (IPv4 and IPv6); repeat for several.
    #[arg(long = "port", value_name = "PORT", required = true,
          value_parser = clap::value_parser!(u16).range(1..))]
    ports: Vec<u16>,
    /// auto: native (driver) XDP, falling back to generic; native; skb (generic).
    #[arg(long = "xdp-mode", value_name = "MODE", default_value = "auto")]
    xdp_mode: AttachMode,
    /// Refuse to start, rather than set them, when net.ipv4.tcp_syncookies or
    /// net.ipv4.tcp_timestamps is not 2 in this network namespace.
    #[arg(long)]
    keep_sysctls: bool,
    /// Seconds between counter log lines (0: none).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    stats_interval: u64,
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
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

fn run(args: RunArgs) -> anyhow::Result<()> {
    if tcpguard::guard::if_index(&args.interface).is_none() {
        anyhow::bail!(
            "interface {:?} does not exist; `ip link` lists the interfaces of this network namespace",
            args.interface
        );
    }
    for required in [TCP_SYNCOOKIES, TCP_TIMESTAMPS] {
        if let Outcome::Changed { from } = required.ensure(!args.keep_sysctls)? {
            info!(
                "set {} from {from} to {} (SYN cookies from XDP need it)",
                required.name, required.required
            );
        }
    }
    let config = sysctl::syn_cookie_config()?;
    let ports: BTreeSet<u16> = args.ports.iter().copied().collect();
    let mut guard = Guard::load(&ports, config)?;
    let attachment = guard.attach(&args.interface, args.xdp_mode)?;
    info!(
        "protecting TCP ports {ports:?} on {} in {} mode (SYN-ACK window scale {}, SACK {})",
        attachment.interface,
        attachment.mode,
        config.window_scale,
        if config.sack != 0 { "on" } else { "off" },
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the event loop")?;
    let outcome = runtime.block_on(serve(&guard, args.stats_interval));
    let totals = guard.counters();
    guard.detach()?;
    info!("detached from {}", args.interface);
    if let Ok(totals) = totals {
        info!("totals: {}", format_counters(&totals, ""));
    }
    outcome
}

/// Logs counter deltas every `interval` seconds until SIGINT or SIGTERM.
async fn serve(guard: &Guard, interval: u64) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let period = Duration::from_secs(interval.max(1));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut last = guard.counters()?;
    loop {
        tokio::select! {
            _ = interrupt.recv() => { info!("SIGINT received, stopping"); return Ok(()) }
            _ = terminate.recv() => { info!("SIGTERM received, stopping"); return Ok(()) }
            _ = ticker.tick(), if interval > 0 => {
                let now = guard.counters()?;
                let delta = now.since(&last);
                if delta.nonzero().next().is_some() {
                    info!("last {interval}s: {}", format_counters(&delta, "+"));
                }
                last = now;
            }
        }
    }
}

fn format_counters(counters: &Counters, sign: &str) -> String {
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
