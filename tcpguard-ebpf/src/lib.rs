#![no_std]
// The programs are binaries (src/main.rs, src/bin/); this library only lets the daemon name the
// crate as a build dependency, so that cargo rebuilds the daemon when the programs change.
