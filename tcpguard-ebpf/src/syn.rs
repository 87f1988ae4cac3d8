//! A SYN to a protected port with a listener is answered here, with a SYN cookie SYN-ACK built in
//! place and sent back with XDP_TX; the kernel keeps no state for it.

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_xdp_adjust_tail, bpf_xdp_load_bytes},
    macros::map,
    maps::PerCpuArray,
    programs::XdpContext,
};
use tcpguard_common::{
    Counter, FlowKey, NO_WINDOW_SCALE, SynCookieConfig,
    tcp_flags::{ACK, ECE, SYN},
};

use crate::{
    checksum,
    frame::{at, len},
    integrity, own_cookie,
    parse::{Family, Segment},
    rare,
    socket::Socket,
    zero,
};

const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
const TCPOPT_WINDOW: u8 = 3;
const TCPOPT_SACK_PERM: u8 = 4;
const TCPOPT_TIMESTAMP: u8 = 8;

/// The kernel never uses a window scale above 14 (RFC 7323 §2.3) and clamps larger offers.
const MAX_WINDOW_SCALE: u8 = 14;
/// The low bits of a cookie timestamp carry the options (`cookie_init_timestamp`): 4 bits of
/// the client's window scale (0xF = none), then SACK-permitted. ECN (bit 5) is never offered.
const TS_OPTION_BITS: u32 = 6;
const TS_NO_WINDOW_SCALE: u32 = 0xf;
const TS_SACK: u32 = 1 << 4;

/// A TCP header (at most 60 bytes), with room for an option that claims to run past its end:
/// the option walk reads up to 6 bytes from any position below 60 without a check.
pub type Header = [u8; 66];

/// The longest SYN-ACK TCP header: MSS 4, SACK-permitted + timestamps 12, window scale 4.
const SYNACK_MAX_HLEN: usize = 40;
const SYNACK_TTL_DEFAULT: u8 = 64;

/// The options of a segment that matter to a cookie. Plain fields, not `Option`s: the
/// payload of a `None` is undefined, and LLVM may fill it with whatever a register holds,
/// a pointer included, which the verifier rejects.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpOptions {
    /// The segment carried options at all.
    pub any: bool,
    /// The MSS offered, or 0 when the option is absent.
    pub mss: u16,
    /// The client's window scale, or [`NO_WINDOW_SCALE`].
    pub window_scale: u8,
    pub sack_permitted: bool,
    pub has_timestamp: bool,
    /// The sender's TSval.
    pub timestamp: u32,
    /// The sender's TSecr: on a cookie ACK, the TSval of the SYN-ACK.
    pub timestamp_echo: u32,
}

/// Where [`tcp_options`] puts its result before handing it back; see there.
#[map(name = "OPTIONS_SCRATCH")]
static OPTIONS_SCRATCH: PerCpuArray<TcpOptions> = PerCpuArray::with_max_entries(1, 0);

/// What a SYN-ACK says, decided by the cookie mode and written by [`write_synack_header`].
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

/// Answers the SYN in `segment` (of connection `key`) sent to `listener`, with a cookie of the
/// configured mode. `clock_ns` is TAI for an own cookie, else the monotonic clock.
#[inline(always)]
pub fn answer<const OWN: bool>(
    ctx: &XdpContext,
    segment: &Segment,
    key: &FlowKey,
    listener: &Socket,
    config: &SynCookieConfig,
    clock_ns: u64,
) -> Counter {
    // The helper must see the whole TCP header: it reads the MSS option from it. A stack copy
    // gives it memory of a length the verifier can bound. The same buffer then becomes the
    // SYN-ACK's TCP header, which keeps the program within the 512-byte BPF stack.
    let mut header = MaybeUninit::uninit();
    // SAFETY: a byte array; all-zero is a valid value.
    let header: &mut Header = unsafe { zero::zeroed_in(&mut header) };
    let header_len = match load_header(ctx, segment, header) {
        Ok(len) => len,
        Err(counter) => return counter,
    };
    // What the kernel would check before answering this SYN itself.
    if let Err(counter) = integrity::ipv4_header(ctx, segment)
        .and_then(|()| integrity::tcp_checksum(ctx, segment, header, header_len as usize))
    {
        return counter;
    }
    let options = tcp_options(header, header_len as usize);
    let plan = if OWN {
        let Some(plan) = own_cookie::plan(segment, key, &options, config, clock_ns) else {
            return Counter::CookieUnavailable;
        };
        plan
    } else {
        let (cookie, mss) = match listener.syn_cookie(ctx, segment, header, header_len) {
            Ok(cookie) => cookie,
            Err(error) => {
                rare::syn_cookie_failed(key, error);
                return Counter::CookieUnavailable;
            }
        };
        kernel_plan(cookie, mss, &options, config, clock_ns)
    };
    let tcp_len = write_synack_header(header, &plan);
    if rewrite(ctx, segment, header, tcp_len, config).is_none() {
        rare::syn_ack_failed(key);
        return Counter::SynAckFailed;
    }
    Counter::SynCookieSent
}

/// Copies the segment's TCP header into `header` and returns its length.
#[inline(always)]
pub fn load_header(
    ctx: &XdpContext,
    segment: &Segment,
    header: &mut Header,
) -> Result<u32, Counter> {
    let header_len = (u32::from(segment.data_offset) & 0xf) * 4;
    if header_len < 20 {
        return Err(Counter::BadDataOffset);
    }
    // The same length, re-derived right at the call: LLVM spills header_len before the check
    // above, and Linux 6.1's verifier does not apply the check to the spilled copy (6.12's
    // does), so the length it reloads may be 0, which the helper refuses ("invalid zero-sized
    // read"). A volatile read keeps LLVM from reusing header_len and from dropping the mask
    // as redundant, and the verifier derives 1..=64 from it (equal to header_len, 20..=60;
    // the buffer holds 66).
    // SAFETY: a read of a field of a live reference.
    let data_offset = unsafe { core::ptr::read_volatile(&segment.data_offset) };
    let load_len = (((u32::from(data_offset) & 0xf) * 4).wrapping_sub(1) & 0x3f) + 1;
    // SAFETY: header has room for the 64 bytes load_len allows.
    if unsafe {
        bpf_xdp_load_bytes(
            ctx.as_ptr().cast(),
            segment.l4 as u32,
            header.as_mut_ptr().cast(),
            load_len,
        )
    } != 0
    {
        return Err(Counter::Truncated);
    }
    Ok(header_len)
}

/// The kernel's cookie (listener-mode helper): options survive only through the timestamp,
/// encoded the way the kernel decodes them.
#[inline(always)]
fn kernel_plan(
    cookie: u32,
    mss: u16,
    options: &TcpOptions,
    config: &SynCookieConfig,
    now_ns: u64,
) -> SynAckPlan {
    // The client's scale, when both ends scale windows.
    let client_scale = if config.window_scale == NO_WINDOW_SCALE {
        NO_WINDOW_SCALE
    } else {
        options.window_scale
    };
    // Without a timestamp to carry them, window scaling and SACK cannot survive the cookie.
    let timestamps = options.has_timestamp;
    let sack = timestamps && options.sack_permitted && config.sack != 0;
    SynAckPlan {
        options: options.any,
        isn: cookie,
        mss,
        window_scale: if timestamps && client_scale != NO_WINDOW_SCALE {
            config.window_scale
        } else {
            NO_WINDOW_SCALE
        },
        sack,
        timestamps,
        tsval: cookie_timestamp(client_scale, sack, now_ns),
        tsecr: options.timestamp,
        ecn: false,
    }
}

/// Walks the options of a TCP header, copied into `header`, the way the kernel's
/// `tcp_parse_options` does: option by option to the end of the header, stopping at an
/// end-of-list option or at a length that is too short or runs past the header.
///
/// The walk is unrolled over every byte position of the option space and reads only at that
/// position, so each read is at a constant offset; where the next option starts is data, never
/// an address. (A loop indexed by the option start makes the verifier follow each option
/// layout separately, past its limit.)
///
/// What the walk finds goes straight into a per-CPU slot, whose contents the verifier does not
/// track: its states then differ only by where the next option starts, not by every
/// combination of options seen so far, which on Linux 6.12 took the SYN path past the
/// verifier's 1M-instruction budget. Read back, the options are values it knows nothing
/// about, so it also checks what follows once rather than once per option layout.
#[inline(always)]
pub fn tcp_options(header: &Header, header_len: usize) -> TcpOptions {
    if let Some(options) = common_layout(header, header_len) {
        return options;
    }
    let none = TcpOptions {
        any: header_len > 20,
        mss: 0,
        window_scale: NO_WINDOW_SCALE,
        sack_permitted: false,
        has_timestamp: false,
        timestamp: 0,
        timestamp_echo: 0,
    };
    let Some(slot) = OPTIONS_SCRATCH.get_ptr_mut(0) else {
        return none;
    };
    // SAFETY: a per-CPU slot, used only within this invocation; volatile so that LLVM neither
    // keeps the fields in registers nor forwards the stored values past the load.
    unsafe { slot.write_volatile(none) };
    let mut walk = OptionWalk {
        next: OptionWalk::DONE,
        end: header_len,
        options: slot,
    };
    walk.advance(20);
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
fn common_layout(header: &Header, header_len: usize) -> Option<TcpOptions> {
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
    /// The per-CPU slot the options found go to.
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
        // SAFETY: `options` is the per-CPU slot tcp_options holds for this invocation.
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

/// Turns the SYN's TCP header in `header` into the SYN-ACK `plan` describes (checksum left zero)
/// and returns its length. Bytes past that length, up to [`SYNACK_MAX_HLEN`], are zero. Every
/// option is written at a constant offset: the layouts are Linux's (MSS; SACK-permitted and
/// timestamps, or NOP NOP SACK-permitted; NOP and window scale).
#[inline(always)]
fn write_synack_header(header: &mut Header, plan: &SynAckPlan) -> usize {
    let client_ports = [header[0], header[1], header[2], header[3]];
    let client_seq = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    // SAFETY: `header` is 8-byte aligned (it comes from `zero::zeroed_in`) and 12 and
    // SYNACK_MAX_HLEN are multiples of 4.
    unsafe { zero::clear_words(&mut header[12..SYNACK_MAX_HLEN]) };
    let b = header;
    b[0..2].copy_from_slice(&client_ports[2..4]);
    b[2..4].copy_from_slice(&client_ports[0..2]);
    b[4..8].copy_from_slice(&plan.isn.to_be_bytes());
    b[8..12].copy_from_slice(&client_seq.wrapping_add(1).to_be_bytes());
    b[13] = SYN | ACK | if plan.ecn { ECE } else { 0 };
    // A SYN without options is answered without options, in a frame of the same size: the MSS
    // it is given is the family's minimum, which the client assumes without the option anyway,
    // and growing the frame fails where it has no tailroom (veth, for one).
    if !plan.options {
        b[12] = 5 << 4;
        b[14..16]
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
    b[12] = ((len / 4) as u8) << 4;
    // As the kernel's SYN-ACK: the space a socket starts with, a whole number of segments,
    // unscaled (RFC 7323: a SYN's window is never scaled).
    let segment_size = u32::from(mss).saturating_sub(if plan.timestamps { 12 } else { 0 });
    let window = 65535 - 65535 % segment_size.max(1);
    b[14..16].copy_from_slice(&(window as u16).to_be_bytes());
    len
}

/// TSval of a cookie SYN-ACK, as the kernel's `cookie_init_timestamp` makes it: the kernel's
/// millisecond clock with the options in the low bits, never ahead of that clock.
#[inline(always)]
fn cookie_timestamp(client_window_scale: u8, sack: bool, now_ns: u64) -> u32 {
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

/// Turns the SYN in the frame into the SYN-ACK: Ethernet addresses swapped (VLAN tags kept), the
/// IP header rewritten without options or extension headers, then the TCP header from `tcp`.
/// The addresses are swapped where they lie: a new IPv4 or IPv6 header puts them at the same
/// offsets as the old one, whatever options or extension headers the old one had.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    segment: &Segment,
    tcp: &mut Header,
    tcp_len: usize,
    config: &SynCookieConfig,
) -> Option<()> {
    let ttl = if config.ttl == 0 {
        SYNACK_TTL_DEFAULT
    } else {
        config.ttl
    };
    // Resize once, to the SYN-ACK's exact length: a frame that already has the room (every
    // SYN without options, most with) needs no tailroom.
    let full_len = segment.l3 + segment.answer_l3_len() + tcp_len;
    resize(ctx, full_len as i32 - len(ctx) as i32)?;
    // SAFETY: every pointer comes from `at`, which checked it against the resized frame.
    unsafe {
        let eth = at::<[[u8; 6]; 2]>(ctx, 0)?;
        let [destination, source] = eth.read_unaligned();
        eth.write_unaligned([source, destination]);
        let pseudo_sum = match segment.family {
            Family::V4 => {
                let ip = at::<[u8; 20]>(ctx, segment.l3)?;
                let mut h = ip.read_unaligned();
                let (source, destination) =
                    ([h[12], h[13], h[14], h[15]], [h[16], h[17], h[18], h[19]]);
                h = [0; 20];
                h[0] = 0x45;
                h[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
                h[6] = 0x40; // DF
                h[8] = ttl;
                h[9] = 6;
                h[12..16].copy_from_slice(&destination);
                h[16..20].copy_from_slice(&source);
                let ip_checksum = checksum::finish(checksum::add(0, &h));
                h[10..12].copy_from_slice(&ip_checksum);
                ip.write_unaligned(h);
                checksum::add(0, &h[12..20])
            }
            Family::V6 => {
                let ip = at::<[[u8; 8]; 5]>(ctx, segment.l3)?;
                let [_, s0, s1, d0, d1] = ip.read_unaligned();
                let mut first = [0u8; 8];
                first[0] = 0x60;
                first[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
                first[6] = 6;
                first[7] = ttl;
                let h = [first, d0, d1, s0, s1];
                ip.write_unaligned(h);
                h[1..].iter().fold(0, |sum, word| checksum::add(sum, word))
            }
        };
        // Bytes past `tcp_len` are zero and add nothing to the sum.
        let sum = checksum::add(
            checksum::add_tcp_pseudo_word(pseudo_sum, tcp_len),
            &tcp[..SYNACK_MAX_HLEN],
        );
        tcp[16..18].copy_from_slice(&checksum::finish(sum));
        // The fixed header, then each 4-byte word of options the SYN-ACK carries: fixed-size
        // writes, each checked against the frame, are what the verifier can follow.
        let l4 = segment.l3 + segment.answer_l3_len();
        at::<[u8; 20]>(ctx, l4)?.write_unaligned(bytes_at::<20>(tcp, 0));
        for word in 0..(SYNACK_MAX_HLEN - 20) / 4 {
            let offset = 20 + 4 * word;
            if offset >= tcp_len {
                break;
            }
            at::<[u8; 4]>(ctx, l4 + offset)?.write_unaligned(bytes_at::<4>(tcp, offset));
        }
    }
    Some(())
}

/// The `N` bytes of `tcp` at `offset`.
#[inline(always)]
fn bytes_at<const N: usize>(tcp: &Header, offset: usize) -> [u8; N] {
    core::array::from_fn(|i| tcp[offset + i])
}

#[inline(always)]
fn resize(ctx: &XdpContext, delta: i32) -> Option<()> {
    if delta == 0 {
        return Some(());
    }
    // SAFETY: adjusting the tail invalidates earlier packet pointers; callers re-derive them.
    (unsafe { bpf_xdp_adjust_tail(ctx.as_ptr().cast(), delta) } == 0).then_some(())
}
