//! What the kernel checks before it would answer a SYN itself: the IPv4 header checksum, IPv4
//! options it accepts, and the TCP checksum. A SYN that fails any of them is not answered; it
//! goes to the kernel, which drops it, as without tcpguard.

use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_csum_diff, bpf_xdp_load_bytes},
    macros::map,
    maps::PerCpuArray,
    programs::XdpContext,
};
use tcpguard_common::{Counter, checksum, tcp::Header};

use crate::{
    frame::read,
    parse::{Family, Segment},
};

const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;
/// Loose and strict source routes: Linux drops them unless it forwards them
/// (`net.ipv4.conf.*.accept_source_route` is 0 by default); they never reach a local socket
/// straight from the wire.
const IPOPT_LSRR: u8 = 131;
const IPOPT_SSRR: u8 = 137;

/// The longest SYN payload whose checksum is verified (a SYN carries data only with TCP Fast
/// Open, at most an MSS). A longer one goes to the kernel unanswered.
const MAX_PAYLOAD: usize = 1536;
/// `bpf_csum_diff` sums at most this many bytes a call.
const CSUM_CHUNK: usize = 512;

/// Bytes [`load`] may copy: a power of two, so that a mask bounds the length for the verifier.
const SCRATCH_LEN: usize = 2048;

/// An IPv4 header with options (at most 60 bytes), or a SYN's payload, copied off the frame for
/// the checksum helper, which takes lengths the verifier can bound. Slack past the longest
/// copy takes the zeros that round a payload up to whole words.
#[repr(C, align(8))]
pub struct Scratch([u8; SCRATCH_LEN + 8]);

#[map(name = "CHECK_SCRATCH")]
static CHECK_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The IPv4 header's checksum and options, as `ip_rcv` and `ip_options_compile` judge them.
#[inline(always)]
pub fn ipv4_header(ctx: &XdpContext, segment: &Segment) -> Result<(), Counter> {
    if segment.family != Family::V4 {
        return Ok(());
    }
    let header_len = segment.l4.wrapping_sub(segment.l3);
    if !(20..=60).contains(&header_len) {
        return Err(Counter::BadIpHeaderLength);
    }
    // Almost every header has no options: summed where it lies, without a copy.
    if header_len == 20 {
        let header = read::<20>(ctx, segment.l3).ok_or(Counter::Truncated)?;
        if checksum::finish(checksum::add(0, &header)) != [0, 0] {
            return Err(Counter::BadChecksum);
        }
        return Ok(());
    }
    let scratch = scratch()?;
    load(ctx, segment.l3, scratch, header_len)?;
    if checksum::finish(sum_words(scratch, header_len)?) != [0, 0] {
        return Err(Counter::BadChecksum);
    }
    options(&scratch.0, header_len)
}

/// Walks the IPv4 options, unrolled over each byte position as the TCP option walk is (see
/// `tcpguard_common::tcp::walk_options`): a structural check (every option fits its header, no length below 2)
/// and the source-route options Linux refuses for local delivery.
#[inline(always)]
#[expect(
    unused_assignments,
    reason = "the last position of the unrolled walk advances `next` past every position"
)]
fn options(header: &[u8; SCRATCH_LEN + 8], end: usize) -> Result<(), Counter> {
    let mut next = 20;
    macro_rules! at_positions {
        ($($position:literal)+) => { $(
            if next == $position && $position < end {
                let kind = header[$position];
                match kind {
                    IPOPT_END => return Ok(()),
                    IPOPT_NOOP => next += 1,
                    IPOPT_LSRR | IPOPT_SSRR => return Err(Counter::SourceRouted),
                    _ => {
                        let length = usize::from(header[$position + 1]);
                        if length < 2 || $position + length > end {
                            return Err(Counter::BadIpOptions);
                        }
                        next += length;
                    }
                }
            }
        )+ };
    }
    at_positions!(20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39
                  40 41 42 43 44 45 46 47 48 49 50 51 52 53 54 55 56 57 58 59);
    Ok(())
}

/// The TCP checksum over the pseudo-header, `header` (the segment's TCP header, `header_len`
/// bytes followed by zeros) and the payload.
#[inline(always)]
pub fn tcp_checksum(
    ctx: &XdpContext,
    segment: &Segment,
    header: &Header,
    header_len: usize,
) -> Result<(), Counter> {
    let mut sum = match segment.family {
        Family::V4 => checksum::add(
            0,
            &read::<8>(ctx, segment.l3 + 12).ok_or(Counter::Truncated)?,
        ),
        Family::V6 => checksum::add(
            0,
            &read::<32>(ctx, segment.l3 + 8).ok_or(Counter::Truncated)?,
        ),
    };
    sum = checksum::add_tcp_pseudo_word(sum, segment.l4_len);
    sum = checksum::add(sum, &header[..60]);
    let payload_len = segment.l4_len.wrapping_sub(header_len);
    if payload_len > MAX_PAYLOAD {
        return Err(Counter::BadChecksum);
    }
    if payload_len > 0 {
        let scratch = scratch()?;
        load(ctx, segment.l4 + header_len, scratch, payload_len)?;
        // The checksum pads an odd length with a zero byte; whole words need up to three.
        // The index is masked, through a volatile read that keeps LLVM from dropping the mask:
        // LLVM spills payload_len before its check, and Linux 6.1's verifier does not apply
        // the check to the spilled copy, so the index it reloads could be negative. The mask
        // changes no length that passed the check.
        // SAFETY: a read of a local.
        let tail = unsafe { core::ptr::read_volatile(&payload_len) } & (SCRATCH_LEN - 1);
        scratch.0[tail] = 0;
        scratch.0[tail + 1] = 0;
        scratch.0[tail + 2] = 0;
        sum += sum_words(scratch, (payload_len + 3) & !3)?;
    }
    if checksum::finish(sum) != [0, 0] {
        return Err(Counter::BadChecksum);
    }
    Ok(())
}

#[inline(always)]
fn scratch<'a>() -> Result<&'a mut Scratch, Counter> {
    let slot = CHECK_SCRATCH
        .get_ptr_mut(0)
        .ok_or(Counter::CookieUnavailable)?;
    // SAFETY: a per-CPU slot, used only within this invocation.
    Ok(unsafe { &mut *slot })
}

/// Copies `len` bytes (1..=MAX_PAYLOAD) of the frame at `offset` into `scratch`.
#[inline(always)]
fn load(ctx: &XdpContext, offset: usize, scratch: &mut Scratch, len: usize) -> Result<(), Counter> {
    if len == 0 || len > MAX_PAYLOAD {
        return Err(Counter::Truncated);
    }
    // The same length, in a form whose range (1..=SCRATCH_LEN) the verifier sees: LLVM folds
    // the two comparisons above into one it cannot follow, and would drop a mask it knows to be
    // redundant, unless the value passes through a volatile read it cannot see through.
    // SAFETY: a read of a local.
    let len = unsafe { core::ptr::read_volatile(&len) };
    let len = (len.wrapping_sub(1) & (SCRATCH_LEN - 1)) + 1;
    // SAFETY: scratch has room for SCRATCH_LEN bytes; the helper checks the frame's bounds.
    let loaded = unsafe {
        bpf_xdp_load_bytes(
            ctx.as_ptr().cast(),
            offset as u32,
            scratch.0.as_mut_ptr().cast(),
            len as u32,
        )
    };
    if loaded != 0 {
        return Err(Counter::Truncated);
    }
    Ok(())
}

/// The one's complement sum of the first `len` bytes of `scratch` (a multiple of 4, at most
/// MAX_PAYLOAD), in `checksum`'s representation: `bpf_csum_diff` sums in the machine's byte
/// order too.
#[inline(always)]
fn sum_words(scratch: &mut Scratch, len: usize) -> Result<u64, Counter> {
    let mut sum = 0u64;
    let mut chunk = 0;
    while chunk < MAX_PAYLOAD / CSUM_CHUNK {
        let offset = chunk * CSUM_CHUNK;
        if offset >= len {
            break;
        }
        let size = (len - offset).min(CSUM_CHUNK) & !3;
        // The same size, masked through a volatile read that keeps LLVM from dropping the
        // mask: LLVM spills `len` before its checks, and Linux 6.1's verifier does not apply
        // them to the spilled copy, so the size it reloads could be negative. The mask
        // (0..=1020, whole words) changes no size that passed them.
        // SAFETY: a read of a local.
        let size = unsafe { core::ptr::read_volatile(&size) } & (2 * CSUM_CHUNK - 4);
        // SAFETY: `size` bytes from `offset` lie inside the scratch buffer.
        let partial = unsafe {
            bpf_csum_diff(
                core::ptr::null_mut(),
                0,
                scratch.0.as_mut_ptr().add(offset).cast(),
                size as u32,
                0,
            )
        };
        if partial < 0 {
            return Err(Counter::BadChecksum);
        }
        sum += partial as u64 & 0xffff_ffff;
        chunk += 1;
    }
    Ok(sum)
}
