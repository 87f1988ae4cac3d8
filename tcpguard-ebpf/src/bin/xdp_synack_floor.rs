//! Benchmark only: the rig's floor. Turns every untagged IPv4 TCP SYN into a SYN-ACK in place
//! (MACs, addresses and ports swapped, a fixed ISN, no cookie, options left as the SYN had
//! them) and sends it back with XDP_TX, counting each. What any XDP answer to a SYN pays on
//! this rig (veth receive, XDP_TX, the far end's receive) and nothing more, so that
//! `bench flood` can put each defence's cost per SYN against it.
//!
//! Two programs: `xdp_synack_floor` answers every SYN; `xdp_synack_floor_lookup` first asks
//! the kernel's socket table for the SYN's 4-tuple (`bpf_skc_lookup_tcp`) and answers only when
//! what it finds is a listener. That lookup is what a correct answer cannot skip: the kernel
//! answers only for a listening port, and a SYN for a 4-tuple it already has a socket for
//! (TIME-WAIT reuse, a retransmission) is its own. Everything else a defence does is on top.

#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock_tuple, xdp_action},
    helpers::generated::{bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

/// SYN-ACKs sent, per CPU.
#[map]
static ANSWERED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const IP: usize = 14;
const TCP: usize = IP + 20;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const ISN: u32 = 0x1234_5678;
/// `BPF_TCP_LISTEN` in `bpf_sock.state`.
const TCP_LISTEN: u32 = 10;

#[xdp]
pub fn xdp_synack_floor(ctx: XdpContext) -> u32 {
    answer::<false>(&ctx)
}

#[xdp]
pub fn xdp_synack_floor_lookup(ctx: XdpContext) -> u32 {
    answer::<true>(&ctx)
}

/// `LOOKUP`: answer only SYNs whose 4-tuple the kernel would hand to a listener.
#[inline(always)]
fn answer<const LOOKUP: bool>(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + TCP + 20 > end {
        return xdp_action::XDP_PASS;
    }
    let frame = start as *mut u8;
    // SAFETY: every offset below is under TCP + 20, checked against data_end above.
    unsafe {
        let byte = |offset: usize| *frame.add(offset);
        // IPv4 without options, TCP, flags exactly SYN.
        if byte(12) != 0x08 || byte(13) != 0x00 || byte(IP) != 0x45 || byte(IP + 9) != 6 {
            return xdp_action::XDP_PASS;
        }
        if byte(TCP + 13) & (SYN | ACK) != SYN {
            return xdp_action::XDP_PASS;
        }
        if LOOKUP && !for_listener(ctx, frame) {
            return xdp_action::XDP_PASS;
        }
        swap(frame, 0, 6, 6);
        swap(frame, IP + 12, IP + 16, 4);
        swap(frame, TCP, TCP + 2, 2);
        // Sequence and acknowledgment numbers and flags change; the checksum follows them
        // incrementally (RFC 1624). The swaps leave every sum as it was.
        let old = [
            word(frame, TCP + 4),
            word(frame, TCP + 6),
            word(frame, TCP + 8),
            word(frame, TCP + 10),
            word(frame, TCP + 12),
        ];
        let seq = u32::from_be_bytes([byte(TCP + 4), byte(TCP + 5), byte(TCP + 6), byte(TCP + 7)]);
        put32(frame, TCP + 8, seq.wrapping_add(1));
        put32(frame, TCP + 4, ISN);
        *frame.add(TCP + 13) = SYN | ACK;
        let new = [
            word(frame, TCP + 4),
            word(frame, TCP + 6),
            word(frame, TCP + 8),
            word(frame, TCP + 10),
            word(frame, TCP + 12),
        ];
        let mut sum = u32::from(!word(frame, TCP + 16));
        for i in 0..5 {
            sum += u32::from(!old[i]) + u32::from(new[i]);
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let checksum = !(sum as u16);
        *frame.add(TCP + 16) = (checksum >> 8) as u8;
        *frame.add(TCP + 17) = checksum as u8;
    }
    if let Some(count) = ANSWERED.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe { *count += 1 };
    }
    xdp_action::XDP_TX
}

/// Whether the kernel's socket table holds a listener, and nothing more specific, for the
/// 4-tuple of the IPv4 SYN at `frame`.
#[inline(always)]
unsafe fn for_listener(ctx: &XdpContext, frame: *mut u8) -> bool {
    // SAFETY: bpf_sock_tuple is plain old data; all-zero is a valid value. The addresses and
    // ports lie under TCP + 4, which the caller checked; they stay in network byte order.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let v4 = unsafe {
        let v4 = &mut tuple.__bindgen_anon_1.ipv4;
        v4.saddr = (frame.add(IP + 12) as *const u32).read_unaligned();
        v4.daddr = (frame.add(IP + 16) as *const u32).read_unaligned();
        v4.sport = (frame.add(TCP) as *const u16).read_unaligned();
        v4.dport = (frame.add(TCP + 2) as *const u16).read_unaligned();
        v4
    };
    let size = size_of_val(v4) as u32;
    // SAFETY: the helper reads `size` bytes of the tuple; the reference it returns is released
    // below.
    unsafe {
        let sk = bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        );
        if sk.is_null() {
            return false;
        }
        let listener = (*sk).state == TCP_LISTEN;
        bpf_sk_release(sk.cast());
        listener
    }
}

/// The 16-bit big-endian word at `offset`.
#[inline(always)]
unsafe fn word(frame: *mut u8, offset: usize) -> u16 {
    // SAFETY: the caller checked the offset.
    unsafe { u16::from_be_bytes([*frame.add(offset), *frame.add(offset + 1)]) }
}

#[inline(always)]
unsafe fn put32(frame: *mut u8, offset: usize, value: u32) {
    for (i, byte) in value.to_be_bytes().into_iter().enumerate() {
        // SAFETY: the caller checked the offset.
        unsafe { *frame.add(offset + i) = byte };
    }
}

#[inline(always)]
unsafe fn swap(frame: *mut u8, a: usize, b: usize, len: usize) {
    for i in 0..len {
        // SAFETY: the caller checked both ranges.
        unsafe { core::ptr::swap(frame.add(a + i), frame.add(b + i)) };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
