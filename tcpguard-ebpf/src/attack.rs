//! Counts SYNs to protected ports and says whether an attack is on (see
//! `tcpguard_common::attack`): the first SYN of each window rolls the shared state, every SYN
//! adds one to its window's count.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{macros::map, maps::Array};
use tcpguard_common::{AttackConfig, AttackState};

use crate::{clock, rare};

#[map(name = "ATTACK_CONFIG")]
static ATTACK_CONFIG: Array<AttackConfig> = Array::with_max_entries(1, 0);

#[map(name = "ATTACK")]
static ATTACK: Array<AttackState> = Array::with_max_entries(1, 0);

/// What the SYN counting says of the SYN just seen.
pub enum Cookies {
    /// Answer it with a cookie (an attack is on, or cookies are always on).
    Answer,
    /// Leave it to the kernel's normal handshake.
    Leave,
}

/// Counts a SYN to a protected port and says whether to answer it with a cookie.
#[inline(always)]
pub fn syn_seen() -> Cookies {
    let (Some(config), Some(state)) = (ATTACK_CONFIG.get(0), ATTACK.get_ptr_mut(0)) else {
        return Cookies::Answer;
    };
    // The coarse clock (the last tick's time) costs no clock-source read; 100-ms windows need
    // no better.
    let window = clock::coarse().attack_window;
    // SAFETY: the map's single value, shared by every CPU: the window roll is a plain
    // read-modify-write (see tcpguard_common::attack for what a race costs), the count an
    // atomic add.
    let active = unsafe {
        let state = &mut *state;
        if state.window != window {
            let changed = state.roll(window, config);
            if changed.started {
                rare::attack_changed(true, state.change_rate, config.start_rate);
            }
            if changed.ended {
                rare::attack_changed(false, state.rate, config.end_rate());
            }
        }
        // The BPF target has no `AtomicU64`; this is its atomic add instruction.
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &raw mut state.syns[AttackState::slot(window)],
            1,
        );
        state.active != 0
    };
    if active || config.only_under_attack == 0 {
        Cookies::Answer
    } else {
        Cookies::Leave
    }
}
