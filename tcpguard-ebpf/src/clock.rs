//! The coarse clock (CLOCK_MONOTONIC as of the last tick), read from the kernel once per tick
//! and CPU.
//!
//! `bpf_ktime_get_coarse_ns` is a helper call, a few ns on every tracked segment;
//! `bpf_jiffies64`, which the verifier turns into a load of `jiffies` on 64-bit JITs, says
//! whether the tick moved on since this CPU last read the clock. The kernel advances both in the
//! same tick, so the cached time is the one the helper would return, or one tick older when the
//! read falls between the two updates: nothing that counts in 100-ms steps can tell.

use aya_ebpf::{
    helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::PerCpuArray,
};
use tcpguard_common::attack::WINDOW_NS;

/// The clock as this CPU last read it.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Tick {
    /// `jiffies` when it was read.
    jiffies: u64,
    pub coarse_ns: u64,
    /// The attack-detection window `coarse_ns` falls in (`tcpguard_common::attack`), divided
    /// out once per tick rather than on every SYN.
    pub attack_window: u64,
}

#[map(name = "CLOCK_CACHE")]
static CLOCK_CACHE: PerCpuArray<Tick> = PerCpuArray::with_max_entries(1, 0);

/// The kernel's tick count, `jiffies`.
#[inline(always)]
pub fn jiffies() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_jiffies64() }
}

/// The coarse clock now.
#[inline(always)]
pub fn coarse() -> Tick {
    let jiffies = jiffies();
    let Some(cached) = CLOCK_CACHE.get_ptr_mut(0) else {
        return read(jiffies);
    };
    // SAFETY: a per-CPU slot; a program runs on one CPU without preemption, so nothing else
    // writes it meanwhile.
    unsafe {
        if (*cached).jiffies != jiffies {
            *cached = read(jiffies);
        }
        *cached
    }
}

#[inline(always)]
fn read(jiffies: u64) -> Tick {
    // SAFETY: no arguments, no side effects.
    let coarse_ns = unsafe { bpf_ktime_get_coarse_ns() };
    Tick {
        jiffies,
        coarse_ns,
        attack_window: coarse_ns / WINDOW_NS,
    }
}
