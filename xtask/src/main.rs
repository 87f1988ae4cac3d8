//! Developer and CI tasks: `cargo xtask setup | test | demo | bench xdp | bench state`.
//!
//! xtask depends on none of tcpguard's crates: their build needs bpf-linker, which `setup`
//! installs, so it must build on a machine that has nothing yet.

mod setup;

use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "tcpguard's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (nightly rust-src, LLVM 22, bpf-linker, hping3,
    /// iproute2, ethtool, curl) when it is missing.
    Setup,
    /// Set up, build, and run every test (needs root: BPF, network namespaces, XDP).
    Test,
    /// Set up and run the self-contained demo: a web server protected by tcpguard while a
    /// client keeps connecting through a bounded SYN flood, all in network namespaces.
    Demo,
    /// Set up and run a benchmark.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Cost of each path of the XDP program (BPF_PROG_TEST_RUN) against an XDP_PASS baseline.
    Xdp,
    /// Lifecycle events per second through the connection table against a bare hash map, and
    /// memory per tracked connection.
    State,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test => {
            require_root("the tests load BPF programs and make network namespaces")?;
            setup::run()?;
            cargo(&["build", "--bins"])?;
            cargo(&["test", "--workspace", "--exclude", "tcpguard-ebpf"])
        }
        Task::Demo => {
            require_root("the demo makes network namespaces and attaches XDP")?;
            setup::run()?;
            cargo(&["build", "--bins"])?;
            cargo(&["run", "--quiet", "-p", "tcpguard-tests", "--bin", "demo"])
        }
        Task::Bench {
            bench: Bench::State,
        } => {
            setup::run()?;
            cargo(&[
                "run",
                "--quiet",
                "--release",
                "-p",
                "tcpguard-tests",
                "--bin",
                "bench-state",
            ])
        }
        Task::Bench { bench: Bench::Xdp } => {
            require_root("BPF_PROG_TEST_RUN needs root")?;
            setup::run()?;
            cargo(&[
                "run",
                "--quiet",
                "--release",
                "-p",
                "tcpguard-tests",
                "--bin",
                "bench-xdp",
            ])
        }
    }
}

fn require_root(why: &str) -> anyhow::Result<()> {
    let uid = capture(Command::new("id").arg("-u")).context("cannot run `id -u`")?;
    if uid.trim() != "0" {
        bail!("run this as root: {why}");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    if !succeeds(Command::new(&cargo).args(args)) {
        bail!("`cargo {}` failed", args.join(" "));
    }
    Ok(())
}

/// Runs a command with inherited output and says whether it succeeded.
pub(crate) fn succeeds(command: &mut Command) -> bool {
    command.status().is_ok_and(|status| status.success())
}

/// Runs a command and returns its standard output if it succeeded.
pub(crate) fn capture(command: &mut Command) -> anyhow::Result<String> {
    let output = command.output()?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
