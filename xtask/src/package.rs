//! `cargo xtask package`: the Debian package, built by cargo-deb, then opened and checked: the
//! binary, the unit, the example configuration as a conffile, the dashboard and alerting
//! rules, maintainer scripts that enable the unit, and a glibc dependency Debian 12 meets.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{capture, cargo, succeeds};

/// Files the package must install.
const CONTENTS: &[&str] = &[
    "./usr/bin/tcpguard",
    "./etc/tcpguard/tcpguard.toml",
    "./usr/share/doc/tcpguard/README.md",
    "./usr/lib/sysusers.d/tcpguard.conf",
    "./usr/lib/tmpfiles.d/tcpguard.conf",
    // README ("Dashboard and alerts") tells where to load them from.
    "./usr/share/tcpguard/grafana-dashboard.json",
    "./usr/share/tcpguard/prometheus-alerts.yml",
    "tcpguard.service",
];

/// The glibc of Debian 12, the oldest release the package is for: the binary links against the
/// glibc of the machine that builds it, and cargo-deb makes the package depend on the newest
/// symbol version it uses, so a package built on a newer distribution would not install there.
const OLDEST_GLIBC: &str = "2.36";

pub fn run() -> anyhow::Result<PathBuf> {
    cargo(&["deb", "--package", "tcpguard", "--quiet"])?;
    let deb = newest_deb()?;
    let contents = capture(Command::new("dpkg-deb").arg("--contents").arg(&deb))
        .context("cannot list the package with dpkg-deb")?;
    for wanted in CONTENTS {
        if !contents.lines().any(|line| line.contains(wanted)) {
            bail!("{} does not install {wanted}:\n{contents}", deb.display());
        }
    }
    let conffiles = capture(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(&deb)
            .arg("conffiles"),
    )
    .context("the package has no conffiles")?;
    if !conffiles.contains("/etc/tcpguard/tcpguard.toml") {
        bail!("/etc/tcpguard/tcpguard.toml is not a conffile: {conffiles}");
    }
    let postinst = capture(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(&deb)
            .arg("postinst"),
    )
    .context("the package has no postinst")?;
    if !postinst.contains("tcpguard.service") {
        bail!("postinst does not enable tcpguard.service:\n{postinst}");
    }
    // The unit runs as the tcpguard user: it must exist before the unit starts.
    let user = postinst.find("systemd-sysusers tcpguard.conf");
    if user.is_none_or(|at| Some(at) > postinst.find("tcpguard.service")) {
        bail!("postinst does not make the tcpguard user before it starts the unit:\n{postinst}");
    }
    let depends = capture(
        Command::new("dpkg-deb")
            .arg("--field")
            .arg(&deb)
            .arg("Depends"),
    )
    .context("cannot read the package's Depends")?;
    let libc = depends
        .split(',')
        .find_map(|dependency| dependency.trim().strip_prefix("libc6 (>= "))
        .and_then(|rest| rest.strip_suffix(')'))
        .with_context(|| format!("the package depends on no libc6 version: {depends}"))?;
    if !succeeds(Command::new("dpkg").args(["--compare-versions", libc, "le", OLDEST_GLIBC])) {
        bail!(
            "{} needs glibc {libc}, newer than Debian 12's {OLDEST_GLIBC}: build it on Debian 12",
            deb.display()
        );
    }
    println!(
        "package: {} (contents checked; needs glibc {libc}, Debian 12 has {OLDEST_GLIBC})",
        deb.display()
    );
    Ok(deb)
}

fn newest_deb() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from("target/debian");
    let mut debs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&dir)
        .with_context(|| format!("cargo-deb left nothing in {}", dir.display()))?
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "deb"))
        .filter_map(|entry| Some((entry.metadata().ok()?.modified().ok()?, entry.path())))
        .collect();
    debs.sort();
    debs.pop()
        .map(|(_, path)| path)
        .with_context(|| format!("no .deb in {}", dir.display()))
}
