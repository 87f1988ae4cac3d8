//! Installs what building and testing tcpguard needs, when it is missing. Quick when all is
//! there: each step first checks, and only installs what the check did not find.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{capture, succeeds};

/// Debian packages: LLVM 22 for bpf-linker (nightly rustc uses LLVM 22 here, and a bpf-linker
/// on an older LLVM fails with "Invalid record"), what linking against it needs, and the tools
/// the tests and the demo drive.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
    // clang compiles the one C eBPF program (tcpguard-ebpf/c/reqsk.c) against libbpf's headers.
    "clang-22",
    "libbpf-dev",
    "hping3",
    "iproute2",
    "ethtool",
    "curl",
    "python3",
    // The monitoring tests read the alerting rules and promtool's unit tests (YAML) with it.
    "python3-yaml",
];

/// cargo-deb builds the Debian package; 3.8.0 is the release the package metadata was written
/// against.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// bpf-linker 0.13 is the release that links for aya-ebpf 0.2 with LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13";
const NIGHTLY: &str = "nightly";
/// The Prometheus project's own Python client, whose text-format parser the end-to-end tests
/// read /metrics with. Pinned so that a parser change cannot turn a test red overnight.
const PROMETHEUS_CLIENT: &str = "prometheus_client==0.21.1";

pub fn run() -> anyhow::Result<()> {
    pinned_toolchain()?;
    nightly_components()?;
    debian_packages()?;
    promtool()?;
    bpf_linker()?;
    python_packages()?;
    cargo_deb()?;
    println!("setup: all prerequisites are present");
    Ok(())
}

/// The toolchain file that pins the compiler for everything but the eBPF crate.
const TOOLCHAIN_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../rust-toolchain.toml");

/// Installs the toolchain rust-toolchain.toml names, with its components, when the toolchain or
/// one of them is missing. rustup 1.29 does this itself when a proxy (cargo, rustc) runs in the
/// workspace, unless RUSTUP_AUTO_INSTALL=0: then cargo refuses to start without the toolchain
/// and runs without the components, so `cargo fmt` and `cargo clippy` fail later.
fn pinned_toolchain() -> anyhow::Result<()> {
    let text = std::fs::read_to_string(TOOLCHAIN_FILE)
        .with_context(|| format!("cannot read {TOOLCHAIN_FILE}"))?;
    let file: toml::Table = text
        .parse()
        .with_context(|| format!("{TOOLCHAIN_FILE} is not valid TOML"))?;
    let toolchain = file.get("toolchain").and_then(toml::Value::as_table);
    let field = |name: &str| toolchain.and_then(|table| table.get(name));
    let channel = field("channel")
        .and_then(toml::Value::as_str)
        .with_context(|| format!("{TOOLCHAIN_FILE} names no [toolchain] channel"))?;
    let profile = field("profile")
        .and_then(toml::Value::as_str)
        .unwrap_or("default");
    let components: Vec<&str> = field("components")
        .and_then(toml::Value::as_array)
        .map(|list| list.iter().filter_map(toml::Value::as_str).collect())
        .unwrap_or_default();
    // Fails when the toolchain is not installed; then everything is missing.
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        channel,
    ]))
    .unwrap_or_default();
    let has = |component: &str| {
        installed
            .lines()
            .any(|line| line == component || line.starts_with(&format!("{component}-")))
    };
    if has("rustc") && components.iter().all(|component| has(component)) {
        return Ok(());
    }
    println!(
        "setup: installing Rust {channel} with {} (pinned by rust-toolchain.toml)",
        components.join(", ")
    );
    let mut install = Command::new("rustup");
    install.args(["toolchain", "install", channel, "--profile", profile]);
    for component in &components {
        install.args(["--component", component]);
    }
    if !succeeds(&mut install) {
        bail!("could not install Rust {channel}; run `rustup toolchain install` in the repository");
    }
    Ok(())
}

/// What the nightly toolchain needs beyond its defaults: rust-src for the eBPF build's
/// `-Z build-std`, clippy to lint the eBPF crate for its target (`cargo xtask test`).
const NIGHTLY_COMPONENTS: [&str; 2] = ["rust-src", "clippy"];

fn nightly_components() -> anyhow::Result<()> {
    let installed = capture(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .context(
        "rustup cannot list the nightly toolchain's components; install it with \
         `rustup toolchain install nightly`",
    )?;
    for component in NIGHTLY_COMPONENTS {
        if installed.lines().any(|line| line.starts_with(component)) {
            continue;
        }
        println!("setup: adding {component} to the nightly toolchain");
        if !succeeds(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            NIGHTLY,
        ])) {
            bail!(
                "could not add {component}; run `rustup component add {component} --toolchain nightly`"
            );
        }
    }
    Ok(())
}

/// `apt-get ARGS`, non-interactive; whether it succeeded.
fn apt(args: &[&str]) -> bool {
    succeeds(
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Whether `tool` is on the PATH.
fn has_command(tool: &str) -> bool {
    succeeds(Command::new("sh").args(["-c", &format!("command -v {tool} >/dev/null")]))
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .map(|status| !status.contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing Debian packages {}", missing.join(" "));
    if !apt(&["update", "-q"]) {
        bail!(
            "`apt-get update` failed; run it as root, then `apt-get install {}`",
            missing.join(" ")
        );
    }
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    if !apt(&install) {
        bail!(
            "could not install {}; install them as root with `apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    Ok(())
}

/// promtool checks the shipped alerting rules and runs their unit tests. Debian ships it in its
/// `prometheus` package (2.42 on Debian 12, whose rule and unit-test formats the files in
/// monitoring/ are written in; they are the same through Prometheus 3). Installing that package
/// also enables and starts a Prometheus server, which nothing here uses (the VM test starts
/// its own, in its namespace): setup stops and disables it again when it installed it.
fn promtool() -> anyhow::Result<()> {
    if has_command("promtool") {
        return Ok(());
    }
    println!(
        "setup: installing Debian's prometheus package for promtool (checks the alerting rules)"
    );
    if !apt(&["update", "-q"])
        || !apt(&[
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "prometheus",
        ])
    {
        bail!("could not install promtool; run `apt-get install prometheus` as root");
    }
    if std::path::Path::new("/run/systemd/system").exists()
        && !succeeds(Command::new("systemctl").args(["disable", "--now", "prometheus.service"]))
    {
        println!(
            "setup: the prometheus package started a Prometheus server that could not be stopped; `systemctl disable --now prometheus` stops it"
        );
    }
    Ok(())
}

/// Debian 12 backports, for qemu: these machines come with qemu-utils 10 from there, which
/// Debian 12's own qemu-system-x86 (7.2) conflicts with.
const BACKPORTS: &str = "/etc/apt/sources.list.d/bookworm-backports.sources";

/// qemu, mmdebstrap, e2fsprogs and Prometheus (the server that scrapes the guest), for
/// `cargo xtask vm-test`.
pub fn vm_packages() -> anyhow::Result<()> {
    let missing = [
        "qemu-system-x86_64",
        "mmdebstrap",
        "mkfs.ext4",
        "prometheus",
    ]
    .into_iter()
    .any(|tool| !has_command(tool));
    if !missing {
        return Ok(());
    }
    if !std::path::Path::new(BACKPORTS).exists() {
        std::fs::write(
            BACKPORTS,
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )
        .with_context(|| format!("cannot write {BACKPORTS}"))?;
    }
    println!("setup: installing qemu (from bookworm-backports), mmdebstrap and e2fsprogs");
    if !apt(&["update", "-q"])
        || !apt(&[
            "install",
            "-y",
            "-q",
            "-t",
            "bookworm-backports",
            "qemu-system-x86",
        ])
        || !apt(&[
            "install",
            "-y",
            "-q",
            "mmdebstrap",
            "e2fsprogs",
            "prometheus",
        ])
    {
        bail!(
            "could not install qemu-system-x86, mmdebstrap, e2fsprogs and prometheus with apt-get"
        );
    }
    Ok(())
}

fn cargo_deb() -> anyhow::Result<()> {
    if let Ok(version) = capture(Command::new("cargo").args(["deb", "--version"]))
        && version.contains(CARGO_DEB_VERSION)
    {
        return Ok(());
    }
    println!("setup: installing cargo-deb {CARGO_DEB_VERSION} (builds the Debian package)");
    if !succeeds(Command::new("cargo").args([
        "install",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
        "cargo-deb",
    ])) {
        bail!(
            "could not install cargo-deb; run `cargo install --locked --version {CARGO_DEB_VERSION} cargo-deb`"
        );
    }
    Ok(())
}

fn python_packages() -> anyhow::Result<()> {
    if succeeds(Command::new("python3").args(["-c", "import prometheus_client"])) {
        return Ok(());
    }
    println!("setup: installing {PROMETHEUS_CLIENT} (the tests parse /metrics with it)");
    if !succeeds(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        PROMETHEUS_CLIENT,
    ])) {
        bail!(
            "could not install {PROMETHEUS_CLIENT}; run `python3 -m pip install {PROMETHEUS_CLIENT}`"
        );
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Ok(version) = capture(Command::new("bpf-linker").arg("--version")) {
        if version.contains(&format!(" {BPF_LINKER_VERSION}.")) {
            return Ok(());
        }
        println!(
            "setup: replacing {} with bpf-linker {BPF_LINKER_VERSION}",
            version.trim()
        );
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"
    );
    let built = succeeds(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--force",
                "--version",
                &format!("~{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            // Debian installs LLVM 22 under its own prefix; without this, bpf-linker's build
            // finds the llvm-config of whatever LLVM /usr/bin points at.
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    );
    if !built {
        bail!(
            "could not build bpf-linker; run `LLVM_PREFIX=/usr/lib/llvm-22 cargo install \
             bpf-linker --locked --version ~{BPF_LINKER_VERSION} --no-default-features \
             --features llvm-22` after `apt-get install llvm-22-dev libpolly-22-dev libzstd-dev`"
        );
    }
    Ok(())
}
