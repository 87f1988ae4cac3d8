//! `tcpguard status --watch`: the daemon's status read again and again, shown as what moved
//! since the previous reading: per-second rates of the counters that changed, and the
//! attack state and the connections by state.

use std::{
    io::{IsTerminal as _, Write as _},
    path::Path,
    time::{Duration, Instant},
};

use tokio::signal::unix::{SignalKind, signal};

use crate::control::{self, Request, Status};

/// Every counter of a status reading by name: the data plane's packet counters, the lifecycle
/// events, and (own cookies) the TC ingress program's handovers.
fn counters(status: &Status) -> Vec<(String, u64)> {
    let mut counters: Vec<(String, u64)> = status
        .packets
        .iter()
        .map(|(name, &value)| (name.clone(), value))
        .collect();
    counters.push(("lifecycle_events".to_owned(), status.events_sent));
    counters.push(("lifecycle_events_lost".to_owned(), status.events_lost));
    counters.extend(
        status
            .cookie_handovers
            .iter()
            .map(|(result, &value)| (format!("cookie_handover_{result}"), value)),
    );
    counters
}

/// What changed from `previous` to `current`, read `seconds` apart, as the lines to show.
/// A counter that went down (the daemon restarted in between) counts from zero.
pub fn frame(previous: &Status, current: &Status, seconds: f64) -> Vec<String> {
    let mut lines = vec![format!(
        "tcpguard on {} (pid {}), up {}s; over the last {seconds:.3} s:",
        current.interface, current.pid, current.uptime_seconds
    )];
    let before = counters(previous);
    let moved: Vec<(String, u64)> = counters(current)
        .into_iter()
        .filter_map(|(name, now)| {
            let then = before
                .iter()
                .find(|(other, _)| *other == name)
                .map_or(0, |(_, value)| *value);
            let increase = if now >= then { now - then } else { now };
            (increase != 0).then_some((name, increase))
        })
        .collect();
    if moved.is_empty() {
        lines.push("  no counter moved".to_owned());
    } else {
        lines.push(format!(
            "  {:<24} {:>14} {:>12}",
            "counter", "per second", "increase"
        ));
        for (name, increase) in moved {
            lines.push(format!(
                "  {name:<24} {:>14.1} {:>12}",
                increase as f64 / seconds,
                format!("+{increase}")
            ));
        }
    }
    lines.push(format!(
        "attack: {}, {} SYN/s to protected ports; cookies {}",
        if current.under_attack {
            "UNDER ATTACK"
        } else {
            "none"
        },
        current.syn_rate,
        current.cookies
    ));
    lines.push(format!(
        "connections: {} tracked, flow maps hold {} per family",
        current.tracked_connections, current.flow_capacity
    ));
    for (states, count) in &current.connections_by_state {
        lines.push(format!("  {count:>8}  {states}"));
    }
    lines
}

fn read(socket: &Path) -> anyhow::Result<(Status, Instant)> {
    let answer = control::ask(socket, Request::Status)?;
    Ok((serde_json::from_str(&answer)?, Instant::now()))
}

/// Shows a frame every `interval` until SIGINT or SIGTERM, or until the reader of a pipe goes
/// away: redrawn in place on a terminal (cursor home, screen cleared), as plain lines with a
/// blank line after each frame otherwise.
pub fn watch(socket: &Path, interval: Duration) -> anyhow::Result<()> {
    let terminal = std::io::stdout().is_terminal();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Installed before the first reading: from here on, Ctrl-C ends the loop below instead
        // of killing the process.
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut previous = read(socket)?;
        let mut stdout = std::io::stdout();
        if terminal {
            writeln!(
                stdout,
                "\x1b[H\x1b[2Jtcpguard: first reading taken, every {interval:?}"
            )?;
            stdout.flush()?;
        }
        loop {
            tokio::select! {
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
                () = tokio::time::sleep(interval) => {}
            }
            let current = read(socket)?;
            let seconds = current.1.duration_since(previous.1).as_secs_f64();
            let mut text = frame(&previous.0, &current.0, seconds).join("\n");
            text.push('\n');
            if terminal {
                text.insert_str(0, "\x1b[H\x1b[2J");
            } else {
                text.push('\n');
            }
            match stdout
                .write_all(text.as_bytes())
                .and_then(|()| stdout.flush())
            {
                // The reader went away (`| head`): as good as Ctrl-C.
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => break,
                result => result?,
            }
            previous = current;
        }
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn status(packets: &[(&str, u64)], events: (u64, u64), states: &[(&str, usize)]) -> Status {
        Status {
            pid: 7,
            version: "0.1.0".to_owned(),
            interface: "eth0".to_owned(),
            xdp_mode: "native".to_owned(),
            adopted: false,
            ports: vec![80],
            uptime_seconds: 12,
            tracked_connections: states.iter().map(|(_, count)| count).sum(),
            flow_capacity: 1024,
            connections_by_state: states
                .iter()
                .map(|(name, count)| ((*name).to_owned(), *count))
                .collect(),
            packets: packets
                .iter()
                .map(|(name, value)| ((*name).to_owned(), *value))
                .collect(),
            events_sent: events.0,
            events_lost: events.1,
            allow: Vec::new(),
            deny: Vec::new(),
            max_connections_per_source: 0,
            cookie_mode: "own".to_owned(),
            cookie_mode_reason: String::new(),
            cookie_handovers: BTreeMap::from([("assigned".to_owned(), 3)]),
            tc_attach: "tcx".to_owned(),
            tc_attach_reason: String::new(),
            cookies: "under-attack".to_owned(),
            cookies_reason: String::new(),
            under_attack: packets.iter().any(|(name, _)| *name == "syn_cookie_sent"),
            syn_rate: 2000,
            attacks: 1,
        }
    }

    #[test]
    fn a_frame_shows_the_rates_of_what_moved_and_the_connections() {
        let before = status(
            &[
                ("syn_cookie_sent", 100),
                ("cookie_accepted", 5),
                ("fragment", 9),
            ],
            (10, 0),
            &[],
        );
        let after = status(
            &[
                ("syn_cookie_sent", 4100),
                ("cookie_accepted", 6),
                ("fragment", 9),
            ],
            (12, 0),
            &[("ESTABLISHED/ESTABLISHED", 1)],
        );
        let lines = frame(&before, &after, 2.0);
        assert_eq!(
            lines,
            [
                "tcpguard on eth0 (pid 7), up 12s; over the last 2.000 s:",
                "  counter                      per second     increase",
                "  cookie_accepted                     0.5           +1",
                "  syn_cookie_sent                  2000.0        +4000",
                "  lifecycle_events                    1.0           +2",
                "attack: UNDER ATTACK, 2000 SYN/s to protected ports; cookies under-attack",
                "connections: 1 tracked, flow maps hold 1024 per family",
                "         1  ESTABLISHED/ESTABLISHED",
            ]
        );
    }

    #[test]
    fn nothing_moved_is_said_and_a_restarted_daemon_counts_from_zero() {
        let quiet = status(&[("syn_cookie_sent", 100)], (10, 0), &[]);
        assert_eq!(frame(&quiet, &quiet, 1.0)[1], "  no counter moved");
        let restarted = status(&[("syn_cookie_sent", 30)], (10, 0), &[]);
        assert_eq!(
            frame(&quiet, &restarted, 1.0)[2],
            "  syn_cookie_sent                    30.0          +30"
        );
    }
}
