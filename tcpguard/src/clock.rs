//! CLOCK_MONOTONIC, the clock `bpf_ktime_get_ns` reads, so that the daemon's times and the
//! data plane's compare directly.

pub fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain old data; CLOCK_MONOTONIC always exists.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

pub fn monotonic_secs() -> u64 {
    monotonic_ns() / 1_000_000_000
}

/// CLOCK_MONOTONIC_COARSE, the clock `bpf_ktime_get_coarse_ns` reads.
pub fn monotonic_coarse_ns() -> u64 {
    // SAFETY: as in monotonic_ns.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
