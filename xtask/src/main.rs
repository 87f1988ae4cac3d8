//! Developer and CI tasks: `cargo xtask setup | test | demo | package | vm-test | vm-images |
//! bench xdp|state|flood|all`.
//!
//! xtask depends on none of tcpguard's crates: their build needs bpf-linker, which `setup`
//! installs, so it must build on a machine that has nothing yet.

mod package;
mod setup;
mod vm;

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
    /// Install what the build and tests need (the Rust toolchain rust-toolchain.toml pins,
    /// nightly rust-src, LLVM 22, bpf-linker, hping3, iproute2, ethtool, curl, promtool) when
    /// it is missing.
    Setup,
    /// Set up, build, and run every test (needs root: BPF, network namespaces, XDP).
    Test,
    /// Set up and run the self-contained demo: a web server protected by tcpguard while a
    /// client keeps connecting through a bounded SYN flood, all in network namespaces.
    Demo,
    /// Set up, build the Debian package (cargo-deb) and check what it installs.
    Package,
    /// Boot Debian guests under qemu, one after the other, that install the package and run
    /// tcpguard as their systemd service with Prometheus, then flood each from the host:
    /// baseline and tcpguard: Debian 12 (Linux 6.1), then Debian 13 (6.12).
    VmTest,
    /// Build the VM test's guest images (cached under /var/cache/tcpguard-vm) without booting
    /// them.
    VmImages,
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
    /// A SYN flood over veth against the kernel's own SYN cookies and against tcpguard: CPU
    /// per SYN answered, client connect latency and success.
    Flood,
    /// All of the above, written to docs/benchmarks.md with a plot (docs/flood.svg).
    All,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test => {
            require_root("the tests load BPF programs and make network namespaces")?;
            setup::run()?;
            clippy_ebpf()?;
            cargo(&["build", "--bins"])?;
            // Every daemon the tests start takes the paths the kernel offers (own cookies on
            // 6.9 and later, TC through TCX on 6.6 and later); then the end-to-end suites run
            // again as on the oldest kernel tcpguard supports (6.1): on the kernel's cookies,
            // with TC attached through netlink, so that all paths pass the same tests.
            cargo(&["test", "--workspace", "--exclude", "tcpguard-ebpf"])?;
            println!(
                "test: the end-to-end suites again, on the kernel's cookies and TC through netlink"
            );
            let mut kernel_path =
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
            kernel_path
                .args(["test", "-p", "tcpguard-tests"])
                .args(END_TO_END_SUITES.iter().flat_map(|suite| ["--test", suite]))
                .env("TCPGUARD_TEST_COOKIE_MODE", "kernel")
                .env("TCPGUARD_TEST_TC_NETLINK", "1");
            if !succeeds(&mut kernel_path) {
                bail!(
                    "the end-to-end tests failed on the kernel's cookies with TC through netlink"
                );
            }
            Ok(())
        }
        Task::Demo => {
            require_root("the demo makes network namespaces and attaches XDP")?;
            setup::run()?;
            cargo(&["build", "--bins"])?;
            cargo(&["run", "--quiet", "-p", "tcpguard-tests", "--bin", "demo"])
        }
        Task::Bench { bench } => {
            require_root("the benchmarks load BPF programs and make network namespaces")?;
            setup::run()?;
            cargo(&["build", "--quiet", "--release", "--bins"])?;
            let run = |name: &str, args: &[&str]| -> anyhow::Result<String> {
                let binary = format!("target/release/{name}");
                let output = Command::new(&binary)
                    .args(args)
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .with_context(|| format!("cannot run {binary}"))?;
                let text = String::from_utf8_lossy(&output.stdout).into_owned();
                print!("{text}");
                if !output.status.success() {
                    bail!("{binary} failed");
                }
                Ok(text)
            };
            match bench {
                Bench::Xdp => run("bench-xdp", &[]).map(|_| ()),
                Bench::State => run("bench-state", &[]).map(|_| ()),
                Bench::Flood => run("bench-flood", &[]).map(|_| ()),
                Bench::All => {
                    std::fs::create_dir_all("docs")?;
                    let xdp = run("bench-xdp", &[])?;
                    let state = run("bench-state", &[])?;
                    let flood = run("bench-flood", &["docs/flood.svg"])?;
                    let machine = capture(Command::new("uname").args(["-sr"]))?;
                    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
                    std::fs::write(
                        "docs/benchmarks.md",
                        format!(
                            "# Benchmarks\n\nWritten by `cargo xtask bench all` on {} with {cores} cores. \
                             Every ratio compares figures measured side by side in the same run.\n\n\
                             ## SYN flood: kernel SYN cookies against tcpguard\n\n![CPU per SYN and client latency](flood.svg)\n\n{flood}\n\
                             ## XDP paths\n\n{xdp}\n## Connection table\n\n{state}",
                            machine.trim()
                        ),
                    )?;
                    println!("written: docs/benchmarks.md, docs/flood.svg");
                    Ok(())
                }
            }
        }
        Task::VmTest => {
            require_root("the VM test makes a network namespace with a tap device")?;
            setup::run()?;
            setup::vm_packages()?;
            let package = package::run()?;
            cargo(&[
                "build",
                "--quiet",
                "--release",
                "-p",
                "tcpguard-tests",
                "--bin",
                "vm-test",
            ])?;
            let mut vm_test = Command::new("target/release/vm-test");
            vm_test.arg(&package);
            for release in vm::RELEASES {
                let image = vm::image(std::path::Path::new(VM_CACHE), release.suite)?;
                vm_test
                    .arg(release.name)
                    .arg(release.cookie_mode)
                    .arg(release.tc_attach)
                    .arg(&image.dir);
            }
            let status = vm_test.status().context("cannot run vm-test")?;
            if !status.success() {
                bail!("the VM test failed");
            }
            Ok(())
        }
        Task::VmImages => {
            require_root("mmdebstrap and mkfs.ext4 build the guests as root")?;
            setup::vm_packages()?;
            for release in vm::RELEASES {
                vm::image(std::path::Path::new(VM_CACHE), release.suite)?;
            }
            Ok(())
        }
        Task::Package => {
            setup::run()?;
            package::run().map(|_| ())
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

/// Where the VM test's guest images are cached.
const VM_CACHE: &str = "/var/cache/tcpguard-vm";

/// Lints the eBPF crate for the target it is built for (the nightly toolchain, as
/// tcpguard/build.rs builds it), warnings denied: the workspace's `cargo clippy` leaves it out,
/// since it builds for no host target.
fn clippy_ebpf() -> anyhow::Result<()> {
    println!("test: clippy on tcpguard-ebpf for bpfel-unknown-none");
    let arch = match std::env::consts::ARCH {
        arch if arch.starts_with("riscv64") => "riscv64",
        arch => arch,
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut clippy = Command::new("rustup");
    clippy
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "tcpguard-ebpf",
        ])
        .args([
            "--lib",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(root.join("target/ebpf-clippy"))
        .args(["--", "-D", "warnings"])
        .current_dir(root.join("tcpguard-ebpf"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\""),
        )
        // The outer cargo's compiler and wrappers are the pinned stable toolchain's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    if !succeeds(&mut clippy) {
        bail!("clippy found faults in tcpguard-ebpf (see above): {clippy:?}");
    }
    Ok(())
}

/// The test suites that drive the real daemon, run once per cookie path.
const END_TO_END_SUITES: &[&str] = &["flood", "operation", "lifecycle", "host"];

pub(crate) fn cargo(args: &[&str]) -> anyhow::Result<()> {
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
