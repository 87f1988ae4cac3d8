//! What an operator watches: the shipped alerting rules (checked and unit-tested by
//! promtool), the shipped Grafana dashboard (every query valid PromQL, naming only what
//! tcpguard exports), and `tcpguard status --watch` against a daemon under a SYN flood. The VM
//! test evaluates the dashboard and the attack alert against a real Prometheus.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;
use tcpguard_tests::{
    monitoring::{self, ALERT_TESTS, ALERTS, DASHBOARD},
    observe::{scrape, status, wait_until},
    rig::{Daemon, Flood, Rig, SERVER, SERVER_IF, tcpguard_binary},
};

const PORT: u16 = 8080;

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(monitoring::directory())
        .output()
        .expect("running promtool (installed by `cargo xtask setup`)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

fn dashboard() -> Value {
    let path = monitoring::directory().join(DASHBOARD);
    let text = std::fs::read_to_string(&path).expect("the dashboard");
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

#[test]
fn the_alerting_rules_pass_promtools_check_and_unit_tests() {
    let checked = promtool(&["check", "rules", ALERTS]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", ALERT_TESTS]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// promtool runs the tests it is given; this makes sure there is one for every alert, both
/// ways.
#[test]
fn every_alert_has_unit_tests_that_fire_it_and_that_do_not() {
    let rules = monitoring::yaml(&monitoring::directory().join(ALERTS));
    let tests = monitoring::yaml(&monitoring::directory().join(ALERT_TESTS));
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .expect("a list of tests")
        .iter()
        .flat_map(|test| test["alert_rule_test"].as_array().into_iter().flatten())
        .collect();
    let alerts = monitoring::alerts(&rules);
    assert!(alerts.len() >= 7, "{alerts:?}");
    for (alert, _) in alerts {
        let expectations: Vec<bool> = cases
            .iter()
            .filter(|case| case["alertname"] == alert.as_str())
            .map(|case| case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
            .collect();
        assert!(
            expectations.contains(&true),
            "no unit test in {ALERT_TESTS} fires {alert}"
        );
        assert!(
            expectations.contains(&false),
            "no unit test in {ALERT_TESTS} expects {alert} not to fire"
        );
    }
}

/// Every panel query, with the dashboard's variables filled in, parses as PromQL: promtool
/// checks them as recording rules.
#[test]
fn every_dashboard_query_is_valid_promql() {
    let dashboard = dashboard();
    assert_eq!(
        monitoring::variables(&dashboard),
        ["datasource", "instance"],
        "the data source and the instance are chosen in the dashboard"
    );
    let queries = monitoring::panel_queries(&dashboard);
    assert!(queries.len() >= 20, "{queries:#?}");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (index, query) in queries.iter().enumerate() {
        let expr = monitoring::substitute(&query.expr, "192.0.2.1:9877", "1m", "1h");
        rules.push_str(&format!(
            "      - record: panel_{index}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let path = std::env::temp_dir().join(format!("tcpguard-dashboard-{}.yml", std::process::id()));
    std::fs::write(&path, &rules).unwrap();
    let output = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("running promtool (installed by `cargo xtask setup`)");
    let _ = std::fs::remove_file(&path);
    assert!(
        output.status.success(),
        "a dashboard query is not valid PromQL:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Every panel and query reads from the chosen data source.
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] != "row" {
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "panel {}",
                panel["title"]
            );
        }
    }
}

/// The words of a PromQL expression that name a metric of tcpguard's, and the values its
/// matchers give the labels tcpguard sets.
fn names_and_label_values(expr: &str) -> (BTreeSet<String>, BTreeSet<(String, String)>) {
    let names = expr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("tcpguard_"))
        .map(str::to_owned)
        .collect();
    let mut values = BTreeSet::new();
    for label in ["reason", "verdict", "result", "mode", "origin"] {
        for (at, _) in expr.match_indices(&format!("{label}=")) {
            let rest = expr[at + label.len() + 1..].trim_start_matches('~');
            let Some(quoted) = rest.strip_prefix('"') else {
                continue;
            };
            let value = &quoted[..quoted.find('"').unwrap()];
            if value == ".+" {
                continue;
            }
            for alternative in value.split('|') {
                values.insert((label.to_owned(), alternative.to_owned()));
            }
        }
    }
    (names, values)
}

/// The dashboard and the rules name only series and label values a running daemon exports: a
/// misspelt name would leave a panel empty or an alert silent.
#[test]
fn the_dashboard_and_the_rules_name_only_what_tcpguard_exports() {
    let rig = Rig::new();
    let _daemon = Daemon::start(&rig.server, &["--iface", SERVER_IF, "--port", "8080"]);
    // A connection, so that the series of tracked connections exist.
    let listener = rig
        .server
        .within(|| TcpListener::bind(("0.0.0.0", PORT)).unwrap());
    let _client = rig
        .client
        .within(|| TcpStream::connect((SERVER, PORT)).expect("connecting"));
    let _server = listener.accept().unwrap();
    let samples = wait_until(
        Duration::from_secs(10),
        "the connection in the metrics",
        || {
            let samples = scrape(&rig.server);
            samples
                .keys()
                .any(|key| key.starts_with("tcpguard_connections{"))
                .then_some(samples)
        },
    );
    let exported_names: BTreeSet<&str> = samples
        .keys()
        .map(|key| key.split('{').next().unwrap())
        .collect();
    let rules = monitoring::yaml(&monitoring::directory().join(ALERTS));
    let mut expressions: Vec<(String, String)> = monitoring::alerts(&rules)
        .into_iter()
        .map(|(alert, expr)| (format!("alert {alert}"), expr))
        .collect();
    expressions.extend(
        monitoring::panel_queries(&dashboard())
            .into_iter()
            .map(|query| (format!("panel {:?}", query.panel), query.expr)),
    );
    for (whose, expr) in expressions {
        let (names, values) = names_and_label_values(&expr);
        for name in names {
            assert!(
                exported_names.contains(name.as_str()),
                "{whose} reads {name}, which tcpguard does not export: {exported_names:?}"
            );
        }
        for (label, value) in values {
            let wanted = format!("{label}=\"{value}\"");
            assert!(
                samples.keys().any(|key| key.contains(&wanted)),
                "{whose} matches {wanted}, which no series of tcpguard's has"
            );
        }
    }
}

/// The lines of `status --watch` up to each blank line, one frame at a time.
fn frames(stdout: impl std::io::Read + Send + 'static) -> mpsc::Receiver<Vec<String>> {
    let (sender, frames) = mpsc::channel();
    std::thread::spawn(move || {
        let mut frame = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.is_empty() {
                if sender.send(std::mem::take(&mut frame)).is_err() {
                    break;
                }
            } else {
                frame.push(line);
            }
        }
    });
    frames
}

/// A frame's counter lines: name → (per second, increase), and the seconds it covers.
fn rates(frame: &[String]) -> (f64, BTreeMap<String, (f64, u64)>) {
    let seconds = frame[0]
        .rsplit("over the last ")
        .next()
        .and_then(|rest| rest.strip_suffix(" s:"))
        .and_then(|seconds| seconds.parse().ok())
        .unwrap_or_else(|| panic!("no interval in {:?}", frame[0]));
    let counters = frame
        .iter()
        .filter_map(|line| {
            let [name, rate, increase] = line.split_whitespace().collect::<Vec<_>>()[..] else {
                return None;
            };
            Some((
                name.to_owned(),
                (
                    rate.parse().ok()?,
                    increase.strip_prefix('+')?.parse().ok()?,
                ),
            ))
        })
        .collect();
    (seconds, counters)
}

fn counter(status: &Value, name: &str) -> u64 {
    match name {
        "lifecycle_events" => status["events_sent"].as_u64().unwrap(),
        _ => status["packets"][name].as_u64().unwrap(),
    }
}

#[test]
fn status_watch_shows_the_rates_the_daemon_counts_and_ends_on_ctrl_c() {
    let rig = Rig::new();
    let daemon = Daemon::start(&rig.server, &["--iface", SERVER_IF, "--port", "8080"]);
    let listener = rig
        .server
        .within(|| TcpListener::bind(("0.0.0.0", PORT)).unwrap());
    let (accepted_sender, accepted) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let _ = accepted_sender.send(());
            drop(stream);
        }
    });
    let before = status(&daemon.paths);
    let mut watch = Command::new(tcpguard_binary())
        .args(["status", "--watch", "1", "--socket"])
        .arg(&daemon.paths.control_socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tcpguard status --watch");
    let frames = frames(watch.stdout.take().unwrap());
    let next = || {
        frames
            .recv_timeout(Duration::from_secs(30))
            .expect("a frame of status --watch")
    };
    // The first frame: the watch took its first reading, and nothing was sent yet.
    let mut shown = vec![next()];

    let flood = Flood::start(&rig.client, &["-S", "--rand-source"], PORT, 3, 100_000);
    let mut connected = 0;
    for _ in 0..20 {
        let stream = rig.client.within(|| {
            TcpStream::connect_timeout(&SocketAddr::from((SERVER, PORT)), Duration::from_secs(3))
        });
        if stream.is_ok() {
            connected += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    flood.wait();
    // Quiet again: the counters the test traffic moves stay put between two readings.
    let compared = [
        "syn_cookie_sent",
        "cookie_accepted",
        "tracked_flow",
        "lifecycle_events",
    ];
    let mut previous = status(&daemon.paths);
    let after = wait_until(Duration::from_secs(20), "the counters to settle", || {
        std::thread::sleep(Duration::from_millis(1500));
        let now = status(&daemon.paths);
        let settled = compared
            .iter()
            .all(|name| counter(&now, name) == counter(&previous, name));
        previous = now.clone();
        settled.then_some(now)
    });
    // Two frames more: the last reading of the watch is one from after the traffic.
    shown.push(next());
    shown.push(next());
    while let Ok(frame) = frames.try_recv() {
        shown.push(frame);
    }

    // SAFETY: signalling the tcpguard process this test started.
    unsafe {
        libc::kill(watch.id() as i32, libc::SIGINT);
    }
    let exit = watch.wait().expect("waiting for status --watch");
    let mut stderr = String::new();
    watch
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        exit.success(),
        "status --watch ended with {exit} on SIGINT: {stderr}"
    );
    while let Ok(frame) = frames.recv_timeout(Duration::from_secs(1)) {
        shown.push(frame);
    }

    let accepted = accepted.try_iter().count();
    assert_eq!(accepted, connected, "every connection made was accepted");
    assert!(connected >= 15, "{connected} of 20 clients connected");
    let mut shown_increase = BTreeMap::<String, u64>::new();
    for frame in &shown {
        let (seconds, counters) = rates(frame);
        for (name, (rate, increase)) in counters {
            // The rate is the increase over the frame's interval (printed to 0.1/s; the
            // interval to 1 ms).
            let expected = increase as f64 / seconds;
            assert!(
                (rate - expected).abs() <= 0.05 + expected * 1e-3,
                "{name}: {rate}/s shown for +{increase} in {seconds} s:\n{}",
                frame.join("\n")
            );
            *shown_increase.entry(name).or_default() += increase;
        }
    }
    eprintln!(
        "frames:\n{}",
        shown
            .iter()
            .map(|f| f.join("\n"))
            .collect::<Vec<_>>()
            .join("\n\n")
    );
    for name in compared {
        let counted = counter(&after, name) - counter(&before, name);
        assert!(counted > 0, "{name} did not move");
        assert_eq!(
            shown_increase.get(name).copied().unwrap_or(0),
            counted,
            "{name}: the frames of status --watch add up to what the daemon counted"
        );
    }
    // The handshakes it shows are the connections the server's kernel accepted.
    assert_eq!(
        shown_increase.get("cookie_accepted").copied(),
        Some(accepted as u64)
    );
    assert!(
        shown.iter().any(|frame| rates(frame)
            .1
            .get("syn_cookie_sent")
            .is_some_and(|(rate, _)| *rate > 1000.0)),
        "a frame during the flood shows SYNs answered by the thousand a second"
    );
    // The last frame shows the connections by state as the daemon has them.
    let last = shown.last().unwrap();
    let shown_states: BTreeMap<String, u64> = last
        .iter()
        .skip_while(|line| !line.starts_with("connections:"))
        .skip(1)
        .map(|line| {
            let (count, states) = line.trim().split_once("  ").unwrap();
            (states.trim().to_owned(), count.parse().unwrap())
        })
        .collect();
    let states: BTreeMap<String, u64> =
        serde_json::from_value(after["connections_by_state"].clone()).unwrap();
    assert_eq!(shown_states, states, "{}", last.join("\n"));
}

/// On a terminal the frame is redrawn in place: cursor home and clear screen before each.
#[test]
fn status_watch_redraws_in_place_on_a_terminal() {
    let rig = Rig::new();
    let daemon = Daemon::start(&rig.server, &["--iface", SERVER_IF, "--port", "8080"]);
    // script(1) gives the watch a pseudo-terminal as its standard output.
    let command = format!(
        "exec {} status --watch 0.5 --socket {}",
        tcpguard_binary().display(),
        daemon.paths.control_socket.display()
    );
    let mut script = Command::new("script")
        .args(["-qefc", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running script (util-linux)");
    let mut stdout = script.stdout.take().unwrap();
    let (sender, output) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(read) = stdout.read(&mut buffer) {
            if read == 0 || sender.send(buffer[..read].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let clear = b"\x1b[H\x1b[2J";
    let frames_drawn = |seen: &[u8]| seen.windows(clear.len()).filter(|w| w == clear).count();
    while frames_drawn(&seen) < 3 {
        seen.extend(
            output
                .recv_timeout(Duration::from_secs(30))
                .expect("status --watch draws on the terminal"),
        );
    }
    let text = String::from_utf8_lossy(&seen);
    let last = text.rsplit("\x1b[H\x1b[2J").next().unwrap();
    assert!(last.starts_with("tcpguard on srv0"), "{last:?}");
    assert!(
        !last.contains("\n\n"),
        "no blank line between frames on a terminal: {last:?}"
    );
    // Ctrl-C on the terminal: the pseudo-terminal turns it into SIGINT for the watch.
    script.stdin.take().unwrap().write_all(b"\x03").unwrap();
    let exit = script.wait().unwrap();
    assert!(exit.success(), "status --watch ended with {exit} on Ctrl-C");
}
