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
    Counter, FlowKey, NO_WINDOW_SCALE, SynCookieConfig, checksum,
    tcp::{self, Header, SYNACK_MAX_HLEN, SynAckPlan, TcpOptions, cookie_timestamp},
};

use crate::{
    frame::{at, len},
    integrity, own_cookie,
    parse::{Family, Segment},
    rare,
    socket::Socket,
    zero,
};

const SYNACK_TTL_DEFAULT: u8 = 64;

/// Where [`tcp_options`] walks options that are not in a common layout; see
/// [`tcp::walk_options`].
#[map(name = "OPTIONS_SCRATCH")]
static OPTIONS_SCRATCH: PerCpuArray<TcpOptions> = PerCpuArray::with_max_entries(1, 0);

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

/// The options of the TCP header copied into `header` (see [`tcp::tcp_options`]), walked, when
/// they are not in a common layout, in this program's per-CPU slot.
#[inline(always)]
pub fn tcp_options(header: &Header, header_len: usize) -> TcpOptions {
    // SAFETY: a per-CPU slot, used only within this invocation.
    unsafe { tcp::tcp_options(header, header_len, || OPTIONS_SCRATCH.get_ptr_mut(0)) }
}

/// Turns the SYN's TCP header in `header` into the SYN-ACK `plan` describes (see
/// [`tcp::write_synack_header`]) and returns its length.
#[inline(always)]
fn write_synack_header(header: &mut Header, plan: &SynAckPlan) -> usize {
    // SAFETY: `header` is 8-byte aligned (it comes from `zero::zeroed_in`) and 12 and
    // SYNACK_MAX_HLEN are multiples of 4.
    unsafe { zero::clear_words(&mut header[12..SYNACK_MAX_HLEN]) };
    tcp::write_synack_header(header, plan)
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
