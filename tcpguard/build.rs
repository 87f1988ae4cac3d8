//! Builds the eBPF programs (tcpguard-ebpf) for the bpf target with the nightly toolchain,
//! `-Z build-std=core` and bpf-linker, into OUT_DIR where src/ebpf.rs includes them.
//!
//! This is what aya-build does, with one code-generation flag more, which aya-build has no way
//! to pass: `allows-misaligned-mem-access`. Without it LLVM reads and writes every packet field
//! that is not naturally aligned one byte at a time (an IPv4 address after a 14-byte Ethernet
//! header, say), and the SYN path spends a fifth of its instructions assembling bytes. The
//! verifier accepts misaligned packet and map-value accesses on architectures with efficient
//! unaligned access (x86-64, arm64); stack accesses must stay aligned, which the program keeps
//! them (see `tcpguard-ebpf/src/zero.rs`).
//!
//! The one program written in C, `tcpguard-ebpf/c/reqsk.c` (it calls a kfunc, which Rust eBPF
//! code cannot yet), is compiled here too, with clang-22 and Debian's libbpf-dev headers.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

const PACKAGE: &str = "tcpguard-ebpf";
/// The binaries of tcpguard-ebpf that src/ebpf.rs includes.
const PROGRAMS: [&str; 6] = [
    "tcpguard",
    "xdp-pass",
    "xdp-syn-flood",
    "xdp-cookie-ack",
    "xdp-synack-floor",
    "xdp-pass-floor",
];
const TOOLCHAIN: &str = "nightly";

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tcpguard-ebpf");
    // The build-dependency on tcpguard-ebpf rebuilds this crate when its library or
    // tcpguard-common change; this covers its binaries.
    println!("cargo:rerun-if-changed={}", root.display());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported target endianness {other:?}; expected little or big"),
    };
    // aya-ebpf picks the kernel's register layout for this architecture.
    let arch = match env::var("CARGO_CFG_TARGET_ARCH")?.as_str() {
        arch if arch.starts_with("riscv64") => "riscv64".to_owned(),
        arch => arch.to_owned(),
    };
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
        "-Ctarget-feature=+allows-misaligned-mem-access".to_owned(),
    ]
    .join("\x1f");
    let target_dir = out_dir.join("ebpf-target");
    let mut cargo = Command::new("rustup");
    cargo
        .args([
            "run",
            TOOLCHAIN,
            "cargo",
            "build",
            "--package",
            PACKAGE,
            "--bins",
        ])
        .args(["--release", "--target", target, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&root)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // The outer build's compiler and wrappers are the stable toolchain's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        // Cargo reads `cargo:` directives from this script's stdout; the inner build's
        // diagnostics go to stderr, which cargo shows when the build fails.
        .stdout(Stdio::null());
    let status = cargo
        .status()
        .context("cannot run rustup; install it, then `cargo xtask setup`")?;
    if !status.success() {
        bail!("building the eBPF programs failed ({status}): {cargo:?}");
    }
    for program in PROGRAMS {
        let built = target_dir.join(target).join("release").join(program);
        std::fs::copy(&built, out_dir.join(program))
            .with_context(|| format!("cannot copy {}", built.display()))?;
    }
    build_reqsk(&root, &out_dir)
}

/// The C program's source, inside tcpguard-ebpf, and the object src/ebpf.rs includes.
const REQSK_SOURCE: &str = "c/reqsk.c";
const REQSK_OBJECT: &str = "reqsk.o";
const CLANG: &str = "clang-22";

fn build_reqsk(root: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let source = root.join(REQSK_SOURCE);
    println!("cargo:rerun-if-changed={}", source.display());
    // linux/bpf.h includes asm/types.h, which Debian keeps under the multiarch directory; a
    // bpf target has no multiarch directory of its own for clang to search.
    let arch = env::var("CARGO_CFG_TARGET_ARCH")?;
    let object = out_dir.join(REQSK_OBJECT);
    let mut clang = Command::new(CLANG);
    clang
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{arch}-linux-gnu"))
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&object)
        .stdout(Stdio::null());
    let status = match clang.status() {
        Ok(status) => status,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => bail!(
            "{CLANG} is not installed, and it compiles {}; run `cargo xtask setup`",
            source.display()
        ),
        Err(err) => return Err(err).with_context(|| format!("cannot run {CLANG}")),
    };
    if !status.success() {
        bail!(
            "compiling {} failed ({status}), see clang's messages above (a missing \
             bpf/bpf_helpers.h means libbpf-dev is not installed: `cargo xtask setup`): {clang:?}",
            source.display()
        );
    }
    Ok(())
}
