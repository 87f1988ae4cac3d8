#![no_std]
// The port table's index mask (ports.rs) is BPF inline assembly.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
// The programs are binaries (src/main.rs, src/bin/); this library lets the daemon name the crate
// as a build dependency, so that cargo rebuilds the daemon when the programs change, and holds
// what more than one of the programs declares.

pub mod ports;
