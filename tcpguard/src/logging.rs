//! The daemon's logger (env_logger), and the level it logs at: `--log-level` when given, else
//! `RUST_LOG` when set (with env_logger's per-module syntax), else `log_level` from the
//! configuration file, which a SIGHUP can change; `info` until the file is read.
//!
//! The data plane's rare events (a helper that failed, a full ring, ...) reach the same logger,
//! at the level each program chose: the Rust programs' through aya-log
//! ([`forward_data_plane_log`]), the C program's as [`RareEvent`]s ([`forward_rare_events`]).

use std::io::{self, Write as _};

use aya::maps::{MapData, RingBuf};
use aya_log::EbpfLogger;
use log::{Level, LevelFilter, Log, Metadata, Record};
use tcpguard_common::{RARE_WARN, RareEvent, rare_event};
use tokio::io::{Interest, unix::AsyncFd};

use crate::daemon::endpoint;

/// Who decides the level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LevelSource {
    /// `--log-level` or `RUST_LOG`: fixed for the life of the process.
    Fixed,
    /// `log_level` in the configuration file, applied with [`follow_config`].
    Config,
}

/// Starts logging. Plain lines; under systemd (JOURNAL_STREAM set) without a timestamp, since
/// journald adds its own.
pub fn init(flag: Option<LevelFilter>) -> LevelSource {
    let rust_log = std::env::var("RUST_LOG")
        .ok()
        .filter(|spec| !spec.is_empty());
    let mut builder = env_logger::Builder::new();
    let source = match (flag, rust_log) {
        (Some(level), _) => {
            builder.filter_level(level);
            LevelSource::Fixed
        }
        (None, Some(spec)) => {
            builder.parse_filters(&spec);
            LevelSource::Fixed
        }
        // Everything passes env_logger; log's global maximum, which follow_config moves, does
        // the filtering.
        (None, None) => {
            builder.filter_level(LevelFilter::Trace);
            LevelSource::Config
        }
    };
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.format(|out, record| writeln!(out, "{}: {}", record.level(), record.args()));
    }
    builder.init();
    if source == LevelSource::Config {
        log::set_max_level(LevelFilter::Info);
    }
    source
}

/// Applies the configuration file's `log_level`, unless the flag or `RUST_LOG` decided.
pub fn follow_config(source: LevelSource, level: LevelFilter) {
    if source == LevelSource::Config {
        log::set_max_level(level);
    }
}

/// A level by name, as `log_level` and `--log-level` take it.
pub fn parse_level(text: &str) -> Result<LevelFilter, String> {
    match text {
        "off" => Ok(LevelFilter::Off),
        "error" => Ok(LevelFilter::Error),
        "warn" => Ok(LevelFilter::Warn),
        "info" => Ok(LevelFilter::Info),
        "debug" => Ok(LevelFilter::Debug),
        "trace" => Ok(LevelFilter::Trace),
        other => Err(format!(
            "log level {other:?} is not one of error, warn, info, debug, trace, off"
        )),
    }
}

/// The logger aya-log hands the Rust programs' lines to: the process's logger, behind the
/// level `log::max_level` says (which [`follow_config`] moves). aya-log calls the logger
/// directly, past the check the `log!` macros make.
pub struct DataPlane;

impl Log for DataPlane {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level() && log::logger().enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            log::logger().log(record);
        }
    }

    fn flush(&self) {
        log::logger().flush();
    }
}

/// Logs the lines the Rust programs write through aya-log as they arrive, for as long as the
/// runtime runs.
pub fn forward_data_plane_log(logger: EbpfLogger<DataPlane>) -> io::Result<()> {
    // SAFETY: the logger owns its ring's file descriptor, which stays open and the same for as
    // long as the logger lives, and the logger lives inside the AsyncFd.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }?;
    tokio::spawn(async move {
        while let Ok(mut ready) = logger.readable_mut().await {
            ready.get_inner_mut().flush();
            ready.clear_ready();
        }
    });
    Ok(())
}

/// Logs the rare events the TC ingress program (C) writes to `ring` as they arrive, for as
/// long as the runtime runs.
pub fn forward_rare_events(ring: RingBuf<MapData>) -> io::Result<()> {
    // SAFETY: the ring owns its map's file descriptor, which stays open and the same for as
    // long as the ring lives, and the ring lives inside the AsyncFd.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?;
    tokio::spawn(async move {
        while let Ok(mut ready) = ring.readable_mut().await {
            while let Some(item) = ready.get_inner_mut().next() {
                if item.len() < size_of::<RareEvent>() {
                    continue;
                }
                // SAFETY: a RareEvent written by the program; the length was checked, and
                // read_unaligned copes with any alignment.
                let event = unsafe { item.as_ptr().cast::<RareEvent>().read_unaligned() };
                let (level, line) = rare_line(&event);
                log::log!(level, "{line}");
            }
            ready.clear_ready();
        }
    });
    Ok(())
}

/// The log line for a rare event of the TC ingress program, at the level it gave it.
pub fn rare_line(event: &RareEvent) -> (Level, String) {
    let level = if event.level == RARE_WARN {
        Level::Warn
    } else {
        Level::Error
    };
    let flow = format!(
        "{} -> {}",
        endpoint(&event.key, true),
        endpoint(&event.key, false)
    );
    let error = || {
        format!(
            "error {} ({})",
            event.error,
            io::Error::from_raw_os_error(event.error.saturating_neg())
        )
    };
    let what = match event.kind {
        rare_event::REQSK_NO_LISTENER => format!(
            "own-cookie ACK {flow} not handed to the kernel: its listener closed after XDP checked the cookie"
        ),
        rare_event::REQSK_REFUSED => format!(
            "bpf_sk_assign_tcp_reqsk failed with {}: the own-cookie ACK {flow} gets no connection",
            error()
        ),
        other => format!("unknown rare event {other} about {flow}"),
    };
    (
        level,
        format!(
            "{what} ({} more on this CPU since the last line)",
            event.held_back
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_name_parses_and_others_are_named_in_the_error() {
        for (name, level) in [
            ("off", LevelFilter::Off),
            ("error", LevelFilter::Error),
            ("warn", LevelFilter::Warn),
            ("info", LevelFilter::Info),
            ("debug", LevelFilter::Debug),
            ("trace", LevelFilter::Trace),
        ] {
            assert_eq!(parse_level(name), Ok(level));
            assert_eq!(level.as_str().to_lowercase(), name);
        }
        assert_eq!(
            parse_level("loud").unwrap_err(),
            "log level \"loud\" is not one of error, warn, info, debug, trace, off"
        );
    }

    #[test]
    fn a_rare_event_reads_as_a_line_with_its_level_addresses_and_error() {
        let mut key = tcpguard_common::FlowKey {
            client_port: 40000,
            server_port: 8080,
            family: tcpguard_common::FLOW_IPV4,
            ..Default::default()
        };
        key.client_addr[..4].copy_from_slice(&[10, 128, 0, 7]);
        key.server_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
        let event = RareEvent {
            key,
            error: -22,
            kind: rare_event::REQSK_REFUSED,
            level: tcpguard_common::RARE_ERROR,
            held_back: 41,
            ..Default::default()
        };
        let (level, line) = rare_line(&event);
        assert_eq!(level, Level::Error);
        assert!(
            line.starts_with(
                "bpf_sk_assign_tcp_reqsk failed with error -22 (Invalid argument (os error 22)): \
                 the own-cookie ACK 10.128.0.7:40000 -> 10.0.0.1:8080 gets no connection"
            ),
            "{line}"
        );
        assert!(
            line.ends_with("(41 more on this CPU since the last line)"),
            "{line}"
        );
        let closed = RareEvent {
            kind: rare_event::REQSK_NO_LISTENER,
            level: RARE_WARN,
            error: 0,
            ..event
        };
        let (level, line) = rare_line(&closed);
        assert_eq!(level, Level::Warn);
        assert!(
            line.starts_with(
                "own-cookie ACK 10.128.0.7:40000 -> 10.0.0.1:8080 not handed to the kernel: its \
                 listener closed after XDP checked the cookie"
            ),
            "{line}"
        );
    }
}
