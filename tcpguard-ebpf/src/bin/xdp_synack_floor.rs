//! Benchmark only: the rig's floor. Turns every untagged IPv4 TCP SYN into a SYN-ACK in place
//! (MACs, addresses and ports swapped, a fixed ISN, no cookie, no socket lookup, options left
//! as the SYN had them) and sends it back with XDP_TX, counting each. What any XDP answer to a
//! SYN pays on this rig (veth receive, XDP_TX, the far end's receive) and nothing more, so
//! that `bench flood` can put each defence's cost per SYN against it.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
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

#[xdp]
pub fn xdp_synack_floor(ctx: XdpContext) -> u32 {
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
