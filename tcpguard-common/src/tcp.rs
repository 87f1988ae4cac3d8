//! TCP header logic the XDP program runs, written once here so that it builds for the host and
//! is tested there: flag validation, option parsing, the SYN-ACK header and the cookie
//! timestamp. Everything is `#[inline(always)]` straight-line code over fixed-size buffers, in
//! the shapes the verifier can follow (see each item); the eBPF crate keeps thin wrappers for
//! what needs its maps or helpers.

use crate::{
    Counter, NO_WINDOW_SCALE,
    tcp_flags::{ACK, ECE, FIN, PSH, RST, SYN, URG},
};

/// Fixed TCP header fields (RFC 9293 §3.1), as offsets into the header.
pub mod field {
    use core::ops::Range;

    pub const SOURCE_PORT: Range<usize> = 0..2;
    pub const DESTINATION_PORT: Range<usize> = 2..4;
    pub const SEQUENCE: Range<usize> = 4..8;
    pub const ACKNOWLEDGMENT: Range<usize> = 8..12;
    /// Data offset in the high 4 bits, in 32-bit words.
    pub const DATA_OFFSET: usize = 12;
    pub const FLAGS: usize = 13;
    pub const WINDOW: Range<usize> = 14..16;
    pub const CHECKSUM: Range<usize> = 16..18;
    /// Where options start.
    pub const OPTIONS: usize = 20;
}

pub const TCPOPT_EOL: u8 = 0;
pub const TCPOPT_NOP: u8 = 1;
pub const TCPOPT_MSS: u8 = 2;
pub const TCPOPT_WINDOW: u8 = 3;
pub const TCPOPT_SACK_PERM: u8 = 4;
pub const TCPOPT_TIMESTAMP: u8 = 8;

/// The kernel never uses a window scale above 14 (RFC 7323 §2.3) and clamps larger offers.
pub const MAX_WINDOW_SCALE: u8 = 14;

/// A TCP header (at most 60 bytes), with room for an option that claims to run past its end:
/// the option walk reads up to 6 bytes from any position below 60 without a check.
pub type Header = [u8; 66];

/// The longest SYN-ACK TCP header: MSS 4, SACK-permitted + timestamps 12, window scale 4.
pub const SYNACK_MAX_HLEN: usize = 40;

/// The flags that decide validity; PSH, ECE and CWR may accompany any valid combination.
const JUDGED_FLAGS: u8 = FIN | SYN | RST | ACK | URG;

/// The combinations TCP sends, as netfilter's conntrack lists them (`tcp_valid_flags`): bit `n`
/// is set when the judged flags `n` are valid.
const VALID_COMBINATIONS: u64 = (1 << SYN)
    | (1 << (SYN | URG))
    | (1 << (SYN | ACK))
    | (1 << RST)
    | (1 << (RST | ACK))
    | (1 << (FIN | ACK))
    | (1 << (FIN | ACK | URG))
    | (1 << ACK)
    | (1 << (ACK | URG));

/// Whether a segment with `flags` is one TCP sends; if not, the counter that says why.
#[inline(always)]
pub fn validate_flags(flags: u8) -> Result<(), Counter> {
    let judged = flags & JUDGED_FLAGS;
    if VALID_COMBINATIONS & (1 << judged) != 0 {
        return Ok(());
    }
    Err(if judged == 0 {
        Counter::NullFlags
    } else if judged & (SYN | FIN) == SYN | FIN {
        Counter::SynFin
    } else if judged & (SYN | RST) == SYN | RST {
        Counter::SynRst
    } else if flags & (FIN | PSH | URG) == FIN | PSH | URG {
        Counter::XmasFlags
    } else if judged & (FIN | ACK) == FIN {
        Counter::FinWithoutAck
    } else {
        Counter::BadFlags
    })
}

/// The options of a segment that matter to a cookie. Plain fields, not `Option`s: the
/// payload of a `None` is undefined, and LLVM may fill it with whatever a register holds,
/// a pointer included, which the verifier rejects.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    /// The segment carried options at all.
    pub any: bool,
    /// The MSS offered, or 0 when the option is absent.
    pub mss: u16,
    /// The sender's window scale (at most [`MAX_WINDOW_SCALE`]), or [`NO_WINDOW_SCALE`].
    pub window_scale: u8,
    pub sack_permitted: bool,
    pub has_timestamp: bool,
    /// The sender's TSval.
    pub timestamp: u32,
    /// The sender's TSecr: on a cookie ACK, the TSval of the SYN-ACK.
    pub timestamp_echo: u32,
}

impl TcpOptions {
    /// What a header of `header_len` bytes says before its options are read.
    #[inline(always)]
    pub fn none(header_len: usize) -> Self {
        Self {
            any: header_len > field::OPTIONS,
            mss: 0,
            window_scale: NO_WINDOW_SCALE,
            sack_permitted: false,
            has_timestamp: false,
            timestamp: 0,
            timestamp_echo: 0,
        }
    }
}

/// The options of the TCP header in `header` (`header_len` bytes, 20..=60), read the way the
/// kernel's `tcp_parse_options` does: option by option to the end of the header, stopping at an
/// end-of-list option or at a length that is too short or runs past the header.
///
/// Most SYNs are read at fixed offsets ([`common_layout`]); the others are walked
/// ([`walk_options`]) into the slot `slot` gives, or not at all when it gives none.
///
/// # Safety
///
/// A pointer `slot` returns must be valid for reads and writes of a `TcpOptions` and used by
/// nothing else meanwhile.
#[inline(always)]
pub unsafe fn tcp_options(
    header: &Header,
    header_len: usize,
    slot: impl FnOnce() -> Option<*mut TcpOptions>,
) -> TcpOptions {
    if let Some(options) = common_layout(header, header_len) {
        return options;
    }
    match slot() {
        // SAFETY: the caller's promise.
        Some(slot) => unsafe { walk_options(header, header_len, slot) },
        None => TcpOptions::none(header_len),
    }
}

/// The options of the TCP header in `header`, walked: see [`tcp_options`]. What the walk finds
/// is written to `*slot` and read back from there.
///
/// The walk is unrolled over every byte position of the option space and reads only at that
/// position, so each read is at a constant offset; where the next option starts is data, never
/// an address. (A loop indexed by the option start makes the verifier follow each option
/// layout separately, past its limit.)
///
/// In the XDP program `slot` is a per-CPU map value, whose contents the verifier does not
/// track: its states then differ only by where the next option starts, not by every
/// combination of options seen so far, which on Linux 6.12 took the SYN path past the
/// verifier's 1M-instruction budget. Read back, the options are values it knows nothing
/// about, so it also checks what follows once rather than once per option layout.
///
/// # Safety
///
/// `slot` must be valid for reads and writes of a `TcpOptions` and used by nothing else
/// meanwhile.
#[inline(always)]
pub unsafe fn walk_options(
    header: &Header,
    header_len: usize,
    slot: *mut TcpOptions,
) -> TcpOptions {
    // SAFETY: the caller's promise; volatile so that LLVM neither keeps the fields in
    // registers nor forwards the stored values past the load.
    unsafe { slot.write_volatile(TcpOptions::none(header_len)) };
    let mut walk = OptionWalk {
        next: OptionWalk::DONE,
        end: header_len,
        options: slot,
    };
    walk.advance(field::OPTIONS);
    macro_rules! at_positions {
        ($($position:literal)+) => { $(walk.step(header, $position);)+ };
    }
    at_positions!(20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39
                  40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59);
    // SAFETY: as above.
    unsafe { slot.read_volatile() }
}

/// The options of most SYNs, recognised at fixed offsets without the walk (which gives the same
/// result for them): Linux's layout (MSS, SACK-permitted, timestamps, NOP, window scale: 20
/// bytes), and MSS, NOP, window scale, NOP, NOP, SACK-permitted (12 bytes: Windows, and Linux
/// without timestamps puts the same options in another order, which takes the walk).
#[inline(always)]
pub fn common_layout(header: &Header, header_len: usize) -> Option<TcpOptions> {
    let b = |i: usize| byte(header, i);
    if b(20) != TCPOPT_MSS || b(21) != 4 {
        return None;
    }
    let mss = u16::from_be_bytes([b(22), b(23)]);
    let scale_at = |i: usize| {
        (b(i) == TCPOPT_NOP && b(i + 1) == TCPOPT_WINDOW && b(i + 2) == 3)
            .then(|| b(i + 3).min(MAX_WINDOW_SCALE))
    };
    let linux = header_len == 40
        && b(24) == TCPOPT_SACK_PERM
        && b(25) == 2
        && b(26) == TCPOPT_TIMESTAMP
        && b(27) == 10;
    let windows = header_len == 32
        && b(28) == TCPOPT_NOP
        && b(29) == TCPOPT_NOP
        && b(30) == TCPOPT_SACK_PERM
        && b(31) == 2;
    let window_scale = if linux {
        scale_at(36)?
    } else if windows {
        scale_at(24)?
    } else {
        return None;
    };
    Some(TcpOptions {
        any: true,
        mss,
        window_scale,
        sack_permitted: true,
        has_timestamp: linux,
        timestamp: if linux { be32(&header[28..32]) } else { 0 },
        timestamp_echo: if linux { be32(&header[32..36]) } else { 0 },
    })
}

/// Byte `i` of `header`, read on its own: see [`be32`].
#[inline(always)]
fn byte(header: &Header, i: usize) -> u8 {
    // SAFETY: a read of a valid, initialised byte.
    unsafe { core::ptr::read_volatile(&header[i]) }
}

struct OptionWalk {
    /// Where the next option starts, or [`OptionWalk::DONE`].
    next: usize,
    end: usize,
    /// Where the options found go (see [`walk_options`]).
    options: *mut TcpOptions,
}

impl OptionWalk {
    /// No position: the walk is over. Each position then costs one comparison.
    const DONE: usize = usize::MAX;

    #[inline(always)]
    fn step(&mut self, header: &Header, position: usize) {
        if position != self.next {
            return;
        }
        let kind = header[position];
        let length = match kind {
            TCPOPT_EOL => 0,
            TCPOPT_NOP => 1,
            _ => usize::from(header[position + 1]),
        };
        if length == 0 || (kind != TCPOPT_NOP && length < 2) || position + length > self.end {
            self.next = Self::DONE;
            return;
        }
        let options = self.options;
        // SAFETY: `options` is the slot walk_options was given, exclusively, for this walk.
        unsafe {
            match (kind, length) {
                (TCPOPT_MSS, 4) => {
                    let mss = be32(&[0, 0, header[position + 2], header[position + 3]]) as u16;
                    (&raw mut (*options).mss).write_volatile(mss);
                }
                (TCPOPT_WINDOW, 3) => {
                    let scale = header[position + 2].min(MAX_WINDOW_SCALE);
                    (&raw mut (*options).window_scale).write_volatile(scale);
                }
                (TCPOPT_SACK_PERM, 2) => (&raw mut (*options).sack_permitted).write_volatile(true),
                (TCPOPT_TIMESTAMP, 10) => {
                    (&raw mut (*options).has_timestamp).write_volatile(true);
                    let tsval = be32(&header[position + 2..position + 6]);
                    (&raw mut (*options).timestamp).write_volatile(tsval);
                    let tsecr = be32(&header[position + 6..position + 10]);
                    (&raw mut (*options).timestamp_echo).write_volatile(tsecr);
                }
                _ => {}
            }
        }
        self.advance(position + length);
    }

    /// Moves to the option at `next`, if the header has one there.
    #[inline(always)]
    fn advance(&mut self, next: usize) {
        self.next = if next < self.end { next } else { Self::DONE };
    }
}

/// The big-endian 32-bit value in `bytes`, read a byte at a time: an option may start at any
/// offset, and the verifier rejects stack reads not aligned to their width. Volatile, so that
/// LLVM does not merge the bytes back into one misaligned read.
#[inline(always)]
fn be32(bytes: &[u8]) -> u32 {
    // SAFETY: reads of valid, initialised bytes.
    u32::from_be_bytes(core::array::from_fn(|i| unsafe {
        core::ptr::read_volatile(&bytes[i])
    }))
}

/// What a SYN-ACK says, decided by the cookie mode and written by [`write_synack_header`].
#[derive(Clone, Copy, Debug)]
pub struct SynAckPlan {
    /// The SYN carried options; without any, the SYN-ACK carries none.
    pub options: bool,
    pub isn: u32,
    pub mss: u16,
    /// The window scale advertised, or [`NO_WINDOW_SCALE`] for no option.
    pub window_scale: u8,
    pub sack: bool,
    pub timestamps: bool,
    pub tsval: u32,
    pub tsecr: u32,
    /// ECN agreed: the SYN-ACK carries ECE (RFC 3168 §6.1.1).
    pub ecn: bool,
}

/// Turns the SYN's TCP header in `header`, whose bytes 12 to [`SYNACK_MAX_HLEN`] the caller
/// has zeroed (the ports, sequence and acknowledgment numbers are read first, from 0..12), into
/// the SYN-ACK `plan` describes (checksum left zero) and returns its length. Bytes past that
/// length, up to [`SYNACK_MAX_HLEN`], stay zero. Every option is written at a constant offset:
/// the layouts are Linux's (MSS; SACK-permitted and timestamps, or NOP NOP SACK-permitted; NOP
/// and window scale).
#[inline(always)]
pub fn write_synack_header(header: &mut Header, plan: &SynAckPlan) -> usize {
    let client_ports = [header[0], header[1], header[2], header[3]];
    let client_seq = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let b = header;
    b[field::SOURCE_PORT].copy_from_slice(&client_ports[2..4]);
    b[field::DESTINATION_PORT].copy_from_slice(&client_ports[0..2]);
    b[field::SEQUENCE].copy_from_slice(&plan.isn.to_be_bytes());
    b[field::ACKNOWLEDGMENT].copy_from_slice(&client_seq.wrapping_add(1).to_be_bytes());
    b[field::FLAGS] = SYN | ACK | if plan.ecn { ECE } else { 0 };
    // A SYN without options is answered without options, in a frame of the same size: the MSS
    // it is given is the family's minimum, which the client assumes without the option anyway,
    // and growing the frame fails where it has no tailroom (veth, for one).
    if !plan.options {
        b[field::DATA_OFFSET] = 5 << 4;
        b[field::WINDOW]
            .copy_from_slice(&(65535 - 65535 % u32::from(plan.mss).max(1)).to_be_bytes()[2..4]);
        return 20;
    }
    let mss = plan.mss;
    b[20..24].copy_from_slice(&[TCPOPT_MSS, 4, (mss >> 8) as u8, mss as u8]);
    let scale = plan.window_scale;
    let scale_option = [TCPOPT_NOP, TCPOPT_WINDOW, 3, scale];
    let scales = scale != NO_WINDOW_SCALE;
    let len = if plan.timestamps {
        b[24..26].copy_from_slice(&if plan.sack {
            [TCPOPT_SACK_PERM, 2]
        } else {
            [TCPOPT_NOP, TCPOPT_NOP]
        });
        b[26..28].copy_from_slice(&[TCPOPT_TIMESTAMP, 10]);
        b[28..32].copy_from_slice(&plan.tsval.to_be_bytes());
        b[32..36].copy_from_slice(&plan.tsecr.to_be_bytes());
        if scales {
            b[36..40].copy_from_slice(&scale_option);
            40
        } else {
            36
        }
    } else if plan.sack {
        b[24..28].copy_from_slice(&[TCPOPT_NOP, TCPOPT_NOP, TCPOPT_SACK_PERM, 2]);
        if scales {
            b[28..32].copy_from_slice(&scale_option);
            32
        } else {
            28
        }
    } else if scales {
        b[24..28].copy_from_slice(&scale_option);
        28
    } else {
        24
    };
    b[field::DATA_OFFSET] = ((len / 4) as u8) << 4;
    // As the kernel's SYN-ACK: the space a socket starts with, a whole number of segments,
    // unscaled (RFC 7323: a SYN's window is never scaled).
    let segment_size = u32::from(mss).saturating_sub(if plan.timestamps { 12 } else { 0 });
    let window = 65535 - 65535 % segment_size.max(1);
    b[field::WINDOW].copy_from_slice(&(window as u16).to_be_bytes());
    len
}

/// The low bits of a cookie timestamp carry the options (`cookie_init_timestamp`): 4 bits of
/// the client's window scale (0xF = none), then SACK-permitted. ECN (bit 5) is never offered.
const TS_OPTION_BITS: u32 = 6;
const TS_NO_WINDOW_SCALE: u32 = 0xf;
const TS_SACK: u32 = 1 << 4;

/// TSval of a cookie SYN-ACK, as the kernel's `cookie_init_timestamp` makes it: the kernel's
/// millisecond clock (`now_ns` on CLOCK_MONOTONIC) with the options in the low bits, never
/// ahead of that clock.
#[inline(always)]
pub fn cookie_timestamp(client_window_scale: u8, sack: bool, now_ns: u64) -> u32 {
    let window_bits = if client_window_scale == NO_WINDOW_SCALE {
        TS_NO_WINDOW_SCALE
    } else {
        u32::from(client_window_scale)
    };
    let option_bits = window_bits | if sack { TS_SACK } else { 0 };
    let now = now_ns / 1_000_000;
    let mut timestamp = (now >> TS_OPTION_BITS << TS_OPTION_BITS) | u64::from(option_bits);
    if timestamp > now {
        timestamp -= 1 << TS_OPTION_BITS;
    }
    timestamp as u32
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use etherparse::{TcpHeader, TcpOptionElement};
    use proptest::prelude::*;

    use super::*;
    use crate::tcp_flags::CWR;

    #[test]
    fn flags_tcp_sends_pass_and_the_others_say_why() {
        // conntrack's tcp_valid_flags, and PSH, ECE, CWR beside any of them.
        let valid = [
            SYN,
            SYN | URG,
            SYN | ACK,
            RST,
            RST | ACK,
            FIN | ACK,
            FIN | ACK | URG,
            ACK,
            ACK | URG,
        ];
        for flags in 0..=u8::MAX {
            let sends = valid.contains(&(flags & !(PSH | ECE | CWR)));
            assert_eq!(validate_flags(flags).is_ok(), sends, "flags {flags:#04x}");
        }
        for (flags, reason) in [
            (0, Counter::NullFlags),
            (PSH | ECE, Counter::NullFlags),
            (FIN | PSH | URG, Counter::XmasFlags),
            (SYN | FIN, Counter::SynFin),
            (SYN | FIN | RST | PSH | ACK | URG, Counter::SynFin),
            (SYN | RST | ACK, Counter::SynRst),
            (FIN, Counter::FinWithoutAck),
            (FIN | PSH, Counter::FinWithoutAck),
            (URG, Counter::BadFlags),
            (RST | FIN | ACK, Counter::BadFlags),
        ] {
            assert_eq!(validate_flags(flags), Err(reason), "flags {flags:#04x}");
        }
    }

    /// `tcp_parse_options` as a plain loop over the option bytes.
    fn reference(options: &[u8]) -> TcpOptions {
        let mut found = TcpOptions::none(20 + options.len());
        let mut at = 0;
        while at < options.len() {
            match options[at] {
                TCPOPT_EOL => break,
                TCPOPT_NOP => {
                    at += 1;
                    continue;
                }
                _ => {}
            }
            let Some(&length) = options.get(at + 1) else {
                break;
            };
            let length = usize::from(length);
            if length < 2 || at + length > options.len() {
                break;
            }
            let value = &options[at + 2..at + length];
            match (options[at], length) {
                (TCPOPT_MSS, 4) => found.mss = u16::from_be_bytes([value[0], value[1]]),
                (TCPOPT_WINDOW, 3) => found.window_scale = value[0].min(14),
                (TCPOPT_SACK_PERM, 2) => found.sack_permitted = true,
                (TCPOPT_TIMESTAMP, 10) => {
                    found.has_timestamp = true;
                    found.timestamp = u32::from_be_bytes(value[0..4].try_into().unwrap());
                    found.timestamp_echo = u32::from_be_bytes(value[4..8].try_into().unwrap());
                }
                _ => {}
            }
            at += length;
        }
        found
    }

    /// `options` in a header padded to whole words, with `beyond` after its end.
    fn parse(options: &[u8], beyond: u8) -> (TcpOptions, TcpOptions) {
        let mut padded = options.to_vec();
        padded.resize(options.len().div_ceil(4) * 4, 0);
        let mut header: Header = [beyond; 66];
        header[..20].fill(0);
        header[20..20 + padded.len()].copy_from_slice(&padded);
        let len = 20 + padded.len();
        let mut slot = TcpOptions::none(0);
        // SAFETY: a local, used by nothing else.
        let parsed = unsafe { tcp_options(&header, len, || Some(&raw mut slot)) };
        // Each way of reading on its own against the reference: the walk always, the fixed
        // offsets where they apply.
        let expected = reference(&padded);
        // SAFETY: as above.
        let walked = unsafe { walk_options(&header, len, &raw mut slot) };
        assert_eq!(walked, expected, "the walk and the reference disagree");
        if let Some(fixed) = common_layout(&header, len) {
            assert_eq!(
                fixed, expected,
                "the fixed offsets and the reference disagree"
            );
        }
        (parsed, expected)
    }

    fn linux_options(mss: u16, tsval: u32, tsecr: u32, scale: u8) -> Vec<u8> {
        let mut options = vec![2, 4];
        options.extend_from_slice(&mss.to_be_bytes());
        options.extend_from_slice(&[4, 2, 8, 10]);
        options.extend_from_slice(&tsval.to_be_bytes());
        options.extend_from_slice(&tsecr.to_be_bytes());
        options.extend_from_slice(&[1, 3, 3, scale]);
        options
    }

    #[test]
    fn linux_and_windows_syns() {
        let (linux, _) = parse(&linux_options(1460, 7, 9, 15), 0xff);
        assert_eq!(
            linux,
            TcpOptions {
                any: true,
                mss: 1460,
                window_scale: 14,
                sack_permitted: true,
                has_timestamp: true,
                timestamp: 7,
                timestamp_echo: 9,
            }
        );
        let (windows, _) = parse(&[2, 4, 5, 0xb4, 1, 3, 3, 8, 1, 1, 4, 2], 0);
        assert_eq!(
            windows,
            TcpOptions {
                any: true,
                mss: 1460,
                window_scale: 8,
                sack_permitted: true,
                has_timestamp: false,
                timestamp: 0,
                timestamp_echo: 0,
            }
        );
        // An option shorter than its own kind and length ends the walk (`tcp_parse_options`:
        // "silly options"), so the MSS after it is not read.
        let (silly, _) = parse(&[30, 1, 2, 4, 5, 0xb4], 0);
        assert_eq!(silly, TcpOptions::none(28));
        let (none, _) = parse(&[], 0xff);
        assert_eq!(none, TcpOptions::none(20));
        // End of list before the window scale: what came before it counts, nothing after.
        let mut cut = linux_options(1460, 7, 9, 7);
        cut[16] = 0;
        let (cut, _) = parse(&cut, 0);
        assert_eq!((cut.mss, cut.has_timestamp), (1460, true));
        assert_eq!(cut.window_scale, NO_WINDOW_SCALE);
    }

    /// One option as a sender might put it, well formed or not.
    fn any_option() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(vec![TCPOPT_NOP]),
            Just(vec![TCPOPT_EOL]),
            any::<u16>().prop_map(|mss| {
                let [high, low] = mss.to_be_bytes();
                vec![TCPOPT_MSS, 4, high, low]
            }),
            any::<u8>().prop_map(|scale| vec![TCPOPT_WINDOW, 3, scale]),
            Just(vec![TCPOPT_SACK_PERM, 2]),
            (any::<u32>(), any::<u32>()).prop_map(|(tsval, tsecr)| {
                let mut option = vec![TCPOPT_TIMESTAMP, 10];
                option.extend_from_slice(&tsval.to_be_bytes());
                option.extend_from_slice(&tsecr.to_be_bytes());
                option
            }),
            // Anything: a wrong length for a known kind, an unknown kind, a length of 0 or 1,
            // one that runs past the header.
            (
                any::<u8>(),
                prop_oneof![0..4u8, any::<u8>()],
                proptest::collection::vec(any::<u8>(), 0..8)
            )
                .prop_map(|(kind, length, mut value)| {
                    value.insert(0, length);
                    value.insert(0, kind);
                    value
                }),
        ]
    }

    fn any_options() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any_option(), 0..12).prop_map(|options| {
                let mut bytes = options.concat();
                bytes.truncate(40);
                bytes
            }),
            // The layouts read at fixed offsets, with any values.
            (any::<u16>(), any::<u32>(), any::<u32>(), any::<u8>())
                .prop_map(|(mss, tsval, tsecr, scale)| linux_options(mss, tsval, tsecr, scale)),
            (any::<u16>(), any::<u8>()).prop_map(|(mss, scale)| {
                let [high, low] = mss.to_be_bytes();
                vec![2, 4, high, low, 1, 3, 3, scale, 1, 1, 4, 2]
            }),
        ]
    }

    proptest! {
        #[test]
        fn options_are_read_as_the_kernel_reads_them(
            options in any_options(),
            beyond in any::<u8>(),
        ) {
            let (parsed, expected) = parse(&options, beyond);
            prop_assert_eq!(parsed, expected);
        }
    }

    fn synack_of(plan: &SynAckPlan) -> (usize, Vec<u8>) {
        let mut header: Header = [0; 66];
        header[..4].copy_from_slice(&[0xc3, 0x50, 0x1f, 0x90]); // 50000 -> 8080
        header[4..8].copy_from_slice(&1000u32.to_be_bytes());
        header[12] = 10 << 4;
        header[13] = SYN;
        header[20..40].copy_from_slice(&linux_options(1460, 7, 9, 7));
        header[12..SYNACK_MAX_HLEN].fill(0);
        let len = write_synack_header(&mut header, plan);
        assert!(header[len..SYNACK_MAX_HLEN].iter().all(|&b| b == 0));
        (len, header[..len].to_vec())
    }

    const PLAN: SynAckPlan = SynAckPlan {
        options: true,
        isn: 0xdead_beef,
        mss: 1460,
        window_scale: 7,
        sack: true,
        timestamps: true,
        tsval: 0x1234_5678,
        tsecr: 7,
        ecn: false,
    };

    fn answered(plan: &SynAckPlan) -> (TcpHeader, Vec<TcpOptionElement>) {
        let (len, bytes) = synack_of(plan);
        let (tcp, rest) = TcpHeader::from_slice(&bytes).expect("etherparse parses it");
        assert!(rest.is_empty());
        assert_eq!(tcp.header_len(), len);
        assert_eq!((tcp.source_port, tcp.destination_port), (8080, 50000));
        assert_eq!(tcp.sequence_number, 0xdead_beef);
        assert_eq!(tcp.acknowledgment_number, 1001);
        assert!(tcp.syn && tcp.ack && !tcp.fin && !tcp.rst && !tcp.psh && !tcp.urg);
        assert_eq!(tcp.ece, plan.ecn);
        assert_eq!(tcp.checksum, 0, "left for the caller");
        let options = tcp.options_iterator().map(|o| o.unwrap()).collect();
        (tcp, options)
    }

    #[test]
    fn a_synack_with_every_option_in_linuxs_layout() {
        use TcpOptionElement::*;
        let (tcp, options) = answered(&PLAN);
        assert_eq!(
            options,
            [
                MaximumSegmentSize(1460),
                SelectiveAcknowledgementPermitted,
                Timestamp(0x1234_5678, 7),
                Noop,
                WindowScale(7)
            ]
        );
        // 45 segments of 1448 bytes (the MSS less the timestamp option).
        assert_eq!(tcp.window_size, 65_160);
    }

    #[test]
    fn a_synack_without_timestamps_or_sack() {
        use TcpOptionElement::*;
        let (tcp, options) = answered(&SynAckPlan {
            timestamps: false,
            ecn: true,
            ..PLAN
        });
        assert_eq!(
            options,
            [
                MaximumSegmentSize(1460),
                Noop,
                Noop,
                SelectiveAcknowledgementPermitted,
                Noop,
                WindowScale(7)
            ]
        );
        assert_eq!(tcp.window_size, 64_240); // 44 × 1460
        let (_, options) = answered(&SynAckPlan {
            timestamps: false,
            sack: false,
            window_scale: NO_WINDOW_SCALE,
            ..PLAN
        });
        assert_eq!(options, [MaximumSegmentSize(1460)]);
        let (_, options) = answered(&SynAckPlan {
            sack: false,
            window_scale: NO_WINDOW_SCALE,
            ..PLAN
        });
        assert_eq!(
            options,
            [
                MaximumSegmentSize(1460),
                Noop,
                Noop,
                Timestamp(0x1234_5678, 7)
            ]
        );
    }

    #[test]
    fn a_synack_to_a_syn_without_options_has_none() {
        let (tcp, options) = answered(&SynAckPlan {
            options: false,
            mss: 536,
            ..PLAN
        });
        assert!(options.is_empty());
        assert_eq!(tcp.window_size, 65_392); // 122 × 536
    }

    #[test]
    fn cookie_timestamps_carry_the_options_below_the_clock() {
        const MS: u64 = 1_000_000;
        // 1000 ms: 960 with the low 6 bits clear, then scale 7 and SACK (0b01_0111).
        assert_eq!(cookie_timestamp(7, true, 1000 * MS), 983);
        // No window scale is 0xF.
        assert_eq!(cookie_timestamp(NO_WINDOW_SCALE, false, 1000 * MS), 975);
        assert_eq!(cookie_timestamp(NO_WINDOW_SCALE, true, 1000 * MS), 991);
        // 970 ms: 983 would be ahead of the clock, so the previous 64-ms step.
        assert_eq!(cookie_timestamp(7, true, 970 * MS), 919);
        // The kernel's clock is 32 bits of milliseconds: it wraps.
        let wrapped = (u64::from(u32::MAX) + 1 + 1000) * MS;
        assert_eq!(cookie_timestamp(7, true, wrapped), 983);
    }
}
