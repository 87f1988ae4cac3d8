//! The dashboard and alerting rules tcpguard ships (`monitoring/`, installed under
//! /usr/share/tcpguard/): the queries of the dashboard's panels as Prometheus will run them,
//! and the alerts of the rules file.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

/// The repository's `monitoring/` directory.
pub fn directory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring")
}

pub const DASHBOARD: &str = "grafana-dashboard.json";
pub const ALERTS: &str = "prometheus-alerts.yml";
pub const ALERT_TESTS: &str = "prometheus-alerts.test.yml";

/// One query of a dashboard panel.
#[derive(Clone, Debug)]
pub struct PanelQuery {
    pub panel: String,
    pub legend: String,
    /// As written in the dashboard, with Grafana's variables.
    pub expr: String,
}

/// Every query of every panel of a Grafana dashboard (rows included, collapsed or not).
/// Panels without a query are refused: each panel is there to show something.
pub fn panel_queries(dashboard: &Value) -> Vec<PanelQuery> {
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .expect("a dashboard has a list of panels")
        .iter()
        .collect();
    while let Some(panel) = panels.pop() {
        if panel["type"] == "row" {
            panels.extend(panel["panels"].as_array().into_iter().flatten());
            continue;
        }
        let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("a query of panel {title:?} has no expr"))
                .to_owned();
            queries.push(PanelQuery {
                panel: title.clone(),
                legend: target["legendFormat"].as_str().unwrap_or("").to_owned(),
                expr,
            });
        }
    }
    queries.reverse();
    queries
}

/// The names of the dashboard's template variables.
pub fn variables(dashboard: &Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|variable| variable["name"].as_str().map(str::to_owned))
        .collect()
}

/// A query with Grafana's variables replaced the way Grafana would for one selected
/// `instance`: `$__rate_interval` by `rate_interval` (Grafana makes it at least four scrape
/// intervals) and `$__range` by `range`. Any other variable left is refused.
pub fn substitute(expr: &str, instance: &str, rate_interval: &str, range: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", rate_interval)
        .replace("$__range", range)
        .replace("${instance}", &regex_escape(instance))
        .replace("$instance", &regex_escape(instance));
    // label_replace's "$1" is PromQL's own; any other `$` is a variable Grafana would fill in.
    let unknown = expr
        .match_indices('$')
        .any(|(at, _)| !expr[at + 1..].starts_with(|c: char| c.is_ascii_digit()));
    assert!(
        !unknown,
        "a variable the test does not fill in is left in {expr:?}"
    );
    expr
}

/// `text` as a regular expression matching only itself, inside a PromQL string, the way
/// Grafana writes the value of a multi-value variable into a `=~` matcher: a special character
/// gets a backslash, which the PromQL string needs doubled (`10\\.0\\.0\\.1:9877`).
fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let special = ".+*?()|[]{}^$".contains(c);
            let escape: &[char] = if special { &['\\', '\\'] } else { &[] };
            escape.iter().copied().chain([c])
        })
        .collect()
}

/// A YAML file as JSON, read by Python's yaml module (python3-yaml, installed by
/// `cargo xtask setup`).
pub fn yaml(path: &Path) -> Value {
    let output = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(path)
        .stderr(Stdio::piped())
        .output()
        .expect("running python3");
    assert!(
        output.status.success(),
        "cannot read {} as YAML: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("python's JSON")
}

/// The alerts of a Prometheus rules file: (name, expression).
pub fn alerts(rules: &Value) -> Vec<(String, String)> {
    rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
        .filter_map(|rule| {
            Some((
                rule["alert"].as_str()?.to_owned(),
                rule["expr"].as_str()?.to_owned(),
            ))
        })
        .collect()
}
