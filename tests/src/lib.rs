//! Rigs for tcpguard's tests: network namespaces that clean up after themselves, frames built
//! byte by byte (malformed ones included), and running the XDP program through the kernel.

pub mod frame;
pub mod generator;
pub mod monitoring;
pub mod netns;
pub mod observe;
pub mod raw;
pub mod rig;
pub mod xdp;
