//! Cookies only under attack: the data plane counts the SYNs that reach protected ports in
//! windows of [`WINDOW_NS`] and answers them with cookies only while the rate is high. Outside an
//! attack a SYN goes to the kernel and gets its normal handshake, with every option it asked for
//! (exact MSS, TCP Fast Open, MPTCP, data on the SYN).
//!
//! An attack starts in the first window whose rate reaches [`AttackConfig::start_rate`]. It ends
//! once [`AttackConfig::calm_windows`] windows in a row stayed below half that rate; a rate
//! between the two changes nothing, so a rate hovering at the threshold switches once, not at
//! every window.
//!
//! The decision is taken in the data plane, by the first SYN of each window: it reads the count
//! of the window that just ended (kept in [`AttackState::syns`], one slot per window modulo 4)
//! and calls [`AttackState::roll`]. Windows no SYN arrived in count as calm. Two CPUs that roll
//! the same window at once may both count a transition; the counts are a report, the state is
//! what the next window's SYNs read.

/// Length of a counting window: 100 ms, so an attack is seen within a tenth of a second.
pub const WINDOW_NS: u64 = 100_000_000;
/// Windows per second, to turn a window's count into SYN/s.
pub const WINDOWS_PER_S: u64 = 1_000_000_000 / WINDOW_NS;

/// The single entry of [`crate::maps::ATTACK_CONFIG`], written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttackConfig {
    /// 1: cookies only under attack; 0: cookies for every SYN (the rate is measured either way).
    pub only_under_attack: u32,
    /// Calm windows in a row that end an attack.
    pub calm_windows: u32,
    /// SYN/s to protected ports from which an attack starts.
    pub start_rate: u64,
}

impl AttackConfig {
    /// The SYN/s below which a window of an attack counts as calm: half the start rate,
    /// rounded up.
    #[inline(always)]
    pub fn end_rate(&self) -> u64 {
        self.start_rate / 2 + self.start_rate % 2
    }
}

/// The single entry of [`crate::maps::ATTACK`], shared by every CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttackState {
    /// The window SYNs are being counted in (`coarse clock / WINDOW_NS`).
    pub window: u64,
    /// SYNs counted per window, in slot `window % 4`.
    pub syns: [u64; 4],
    /// SYN/s in the last window that ended.
    pub rate: u64,
    /// SYN/s of the window that started or ended the last attack.
    pub change_rate: u64,
    /// Attacks started and ended so far.
    pub started: u64,
    pub ended: u64,
    /// 1 while under attack.
    pub active: u32,
    /// Calm windows in a row so far, while under attack.
    pub calm: u32,
}

/// What a [`AttackState::roll`] changed. One roll can start an attack and end it: a burst in
/// the window it judges, then enough windows without a SYN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transitions {
    pub started: bool,
    pub ended: bool,
}

impl Transitions {
    pub const NONE: Self = Self {
        started: false,
        ended: false,
    };
    pub const STARTED: Self = Self {
        started: true,
        ended: false,
    };
    pub const ENDED: Self = Self {
        started: false,
        ended: true,
    };
}

impl AttackState {
    /// The slot of [`Self::syns`] that `window` counts in.
    #[inline(always)]
    pub fn slot(window: u64) -> usize {
        (window % 4) as usize
    }

    /// Moves the state on to window `now`, judging the window that ended from the SYNs it
    /// counted, and every window between that one and `now` as empty. The slot `now` counts
    /// in starts at zero. Returns the transitions made.
    #[inline(always)]
    pub fn roll(&mut self, now: u64, config: &AttackConfig) -> Transitions {
        if now <= self.window {
            return Transitions::NONE;
        }
        let ended_window = self.window;
        // Clamped rather than `saturating_mul`, which the BPF target cannot build.
        let rate =
            self.syns[Self::slot(ended_window)].min(u64::MAX / WINDOWS_PER_S) * WINDOWS_PER_S;
        let mut transitions = self.judge(rate, config);
        // Windows nobody sent a SYN in: calm, each of them.
        let empty = now - ended_window - 1;
        if empty > 0 {
            self.rate = 0;
            if self.active != 0 {
                self.calm = self
                    .calm
                    .saturating_add(empty.min(u64::from(u32::MAX)) as u32);
                if self.calm >= config.calm_windows {
                    self.end(0);
                    transitions.ended = true;
                }
            }
        }
        self.syns[Self::slot(now)] = 0;
        self.window = now;
        transitions
    }

    /// One window's verdict at `rate` SYN/s.
    #[inline(always)]
    fn judge(&mut self, rate: u64, config: &AttackConfig) -> Transitions {
        self.rate = rate;
        if self.active == 0 {
            if rate >= config.start_rate {
                self.active = 1;
                self.calm = 0;
                self.started += 1;
                self.change_rate = rate;
                return Transitions::STARTED;
            }
        } else if rate < config.end_rate() {
            // Below half the start rate.
            self.calm = self.calm.saturating_add(1);
            if self.calm >= config.calm_windows {
                self.end(rate);
                return Transitions::ENDED;
            }
        } else {
            self.calm = 0;
        }
        Transitions::NONE
    }

    #[inline(always)]
    fn end(&mut self, rate: u64) {
        self.active = 0;
        self.calm = 0;
        self.ended += 1;
        self.change_rate = rate;
    }

    /// The state as it stands at window `now`: [`Self::roll`] on a copy, for a reader (the
    /// daemon) that must not write. An attack whose SYNs stopped altogether ends here even
    /// though no SYN has come to roll the shared state.
    pub fn at(&self, now: u64, config: &AttackConfig) -> Self {
        let mut state = *self;
        state.roll(now, config);
        state
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain old data with no padding.
    unsafe impl aya::Pod for super::AttackConfig {}
    unsafe impl aya::Pod for super::AttackState {}
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: AttackConfig = AttackConfig {
        only_under_attack: 1,
        calm_windows: 10,
        start_rate: 1000,
    };

    /// Feeds `syns` SYNs into each window in turn, as the data plane does, and returns the
    /// transitions.
    fn run(state: &mut AttackState, first_window: u64, syns: &[u64]) -> Vec<Transitions> {
        let mut transitions = Vec::new();
        for (i, &count) in syns.iter().enumerate() {
            let window = first_window + i as u64;
            if count == 0 {
                continue;
            }
            let transition = state.roll(window, &CONFIG);
            if transition != Transitions::NONE {
                transitions.push(transition);
            }
            state.syns[AttackState::slot(window)] += count;
        }
        transitions
    }

    extern crate std;
    use std::{vec, vec::Vec};

    #[test]
    fn a_rate_below_the_threshold_is_no_attack() {
        let mut state = AttackState::default();
        // 99 SYNs a window: 990 SYN/s against 1000.
        assert_eq!(run(&mut state, 1, &[99; 50]), vec![]);
        assert_eq!(state.active, 0);
        assert_eq!(state.rate, 990);
    }

    #[test]
    fn an_attack_starts_in_the_window_after_the_first_one_at_the_rate() {
        let mut state = AttackState::default();
        let transitions = run(&mut state, 1, &[10, 10, 100, 1]);
        assert_eq!(transitions, vec![Transitions::STARTED]);
        assert_eq!(state.active, 1);
        assert_eq!((state.started, state.change_rate), (1, 1000));
    }

    #[test]
    fn an_attack_ends_after_the_calm_windows_below_half_the_rate() {
        let mut state = AttackState::default();
        run(&mut state, 1, &[500, 1]);
        assert_eq!(state.active, 1);
        // Ten windows below 500 SYN/s (49 a window) end it; the tenth is judged when the
        // eleventh window's first SYN arrives.
        let transitions = run(&mut state, 3, &[49; 11]);
        assert_eq!(transitions, vec![Transitions::ENDED]);
        assert_eq!((state.active, state.ended, state.change_rate), (0, 1, 490));
    }

    #[test]
    fn a_rate_hovering_at_the_threshold_switches_once() {
        let mut state = AttackState::default();
        // Alternating 1200 and 800 SYN/s for 20 s: 800 is above half the threshold.
        let syns: Vec<u64> = (0..200)
            .map(|i| if i % 20 < 10 { 120 } else { 80 })
            .collect();
        assert_eq!(run(&mut state, 1, &syns), vec![Transitions::STARTED]);
        assert_eq!(state.active, 1);
    }

    #[test]
    fn windows_without_a_syn_are_calm() {
        let mut state = AttackState::default();
        run(&mut state, 1, &[500, 1]);
        // Nothing for 5 windows, then a SYN: not yet ten calm windows.
        assert_eq!(state.roll(8, &CONFIG), Transitions::NONE);
        assert_eq!((state.active, state.rate), (1, 0));
        // Nothing for 20 windows: ended, as the daemon's reading sees before any SYN comes.
        assert_eq!(state.at(30, &CONFIG).active, 0);
        assert_eq!(state.active, 1, "reading does not write");
        assert_eq!(state.roll(30, &CONFIG), Transitions::ENDED);
    }

    #[test]
    fn one_roll_can_start_an_attack_and_end_it() {
        let mut state = AttackState::default();
        // A burst in window 2 (5000 SYN/s), then no SYN until window 20: the roll at window 20
        // judges the burst (an attack) and the 17 empty windows after it (calm enough to end it).
        run(&mut state, 1, &[1, 500]);
        assert_eq!(
            state.roll(20, &CONFIG),
            Transitions {
                started: true,
                ended: true
            }
        );
        assert_eq!((state.active, state.started, state.ended), (0, 1, 1));
    }

    #[test]
    fn a_slot_is_emptied_when_its_window_begins() {
        let mut state = AttackState {
            syns: [7; 4],
            window: 1,
            ..AttackState::default()
        };
        state.roll(5, &CONFIG);
        assert_eq!(state.syns[AttackState::slot(5)], 0);
        // Window 1's count (70 SYN/s) was judged, window 2..4 empty.
        assert_eq!(state.rate, 0);
    }
}
