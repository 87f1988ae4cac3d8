use which::which;

/// Rebuild when bpf-linker changes: cargo does not track the linker on its own.
fn main() {
    let bpf_linker = which("bpf-linker").expect(
        "bpf-linker is not on PATH; install it with `cargo xtask setup` (or see README.md)",
    );
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
