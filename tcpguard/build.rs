//! Builds the eBPF programs (tcpguard-ebpf) for the bpf target with the nightly toolchain,
//! `-Z build-std=core` and bpf-linker, into OUT_DIR where src/ebpf.rs includes them.

fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "tcpguard-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../tcpguard-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
