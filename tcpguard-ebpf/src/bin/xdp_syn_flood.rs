//! The benchmarks' SYN generator, run with BPF_PROG_TEST_RUN in live-frames mode: each run
//! writes the loader's SYN (untagged IPv4, 20-byte IP header) into the frame, gives it a random
//! source address, port and sequence number, and redirects it out of one interface. It is never
//! attached to an interface.
//!
//! The whole SYN is written every time because live frames are recycled with whatever the far
//! end left in them: a frame tcpguard turned into a SYN-ACK comes back as a SYN-ACK.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{
        bpf_get_prandom_u32, bpf_redirect, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len,
        bpf_xdp_store_bytes,
    },
    macros::xdp,
    programs::XdpContext,
};

/// Set by the loader: the SYN (its first `SYN_LEN` bytes), the interface it leaves by, and the
/// addresses it comes from (`SOURCE_NETWORK | random & SOURCE_HOST_MASK`, host byte order).
#[unsafe(no_mangle)]
static SYN: [u8; SYN_CAPACITY] = [0; SYN_CAPACITY];
#[unsafe(no_mangle)]
static SYN_LEN: u32 = 0;
#[unsafe(no_mangle)]
static TARGET_IFINDEX: u32 = 0;
#[unsafe(no_mangle)]
static SOURCE_NETWORK: u32 = 0;
#[unsafe(no_mangle)]
static SOURCE_HOST_MASK: u32 = 0;

const SYN_CAPACITY: usize = 128;
const IP: usize = 14;
const TCP: usize = IP + 20;

#[xdp]
pub fn xdp_syn_flood(ctx: XdpContext) -> u32 {
    // SAFETY: globals the loader wrote; volatile so that their zero defaults are not folded in.
    let len = unsafe { core::ptr::read_volatile(&SYN_LEN) } as usize;
    if !(TCP + 20..=SYN_CAPACITY).contains(&len) {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the context is the one the kernel passed, and SYN holds at least `len` bytes.
    let written = unsafe {
        let grow = len as i32 - bpf_xdp_get_buff_len(ctx.ctx) as i32;
        bpf_xdp_adjust_tail(ctx.ctx, grow) == 0
            && bpf_xdp_store_bytes(ctx.ctx, 0, SYN.as_ptr() as *mut _, len as u32) == 0
    };
    let start = ctx.data();
    if !written || start + TCP + 20 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let frame = start as *mut u8;
    // SAFETY: as above.
    let (ifindex, network, mask) = unsafe {
        (
            core::ptr::read_volatile(&TARGET_IFINDEX),
            core::ptr::read_volatile(&SOURCE_NETWORK),
            core::ptr::read_volatile(&SOURCE_HOST_MASK),
        )
    };
    // SAFETY: helpers without arguments that could be wrong.
    let (address, port_and_seq) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
    let source = network | address & mask;
    let port = (port_and_seq >> 16) as u16 | 1024;
    let seq = port_and_seq.rotate_left(7);
    // SAFETY: every offset below is within the 54 bytes checked above.
    unsafe {
        let old_source = replace32(frame.add(IP + 12), source);
        let old_port = replace16(frame.add(TCP), port);
        let old_seq = replace32(frame.add(TCP + 4), seq);
        let ip_check = frame.add(IP + 10);
        write16(
            ip_check,
            updated(read16(ip_check), delta32(old_source, source)),
        );
        // The source address is also in TCP's pseudo-header.
        let tcp_check = frame.add(TCP + 16);
        let tcp_delta =
            delta32(old_source, source) + delta16(old_port, port) + delta32(old_seq, seq);
        write16(tcp_check, updated(read16(tcp_check), tcp_delta));
        bpf_redirect(ifindex, 0) as u32
    }
}

/// A checksum field after words whose sum changed by `delta` (RFC 1624: HC' = ~(~HC + ~m + m')).
fn updated(check: u16, delta: u32) -> u16 {
    let mut sum = u32::from(!check) + delta;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

fn delta16(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

fn delta32(old: u32, new: u32) -> u32 {
    delta16((old >> 16) as u16, (new >> 16) as u16) + delta16(old as u16, new as u16)
}

unsafe fn read16(at: *mut u8) -> u16 {
    // SAFETY: the caller checked the bounds.
    u16::from_be_bytes(unsafe { at.cast::<[u8; 2]>().read_unaligned() })
}

unsafe fn write16(at: *mut u8, value: u16) {
    // SAFETY: the caller checked the bounds.
    unsafe { at.cast::<[u8; 2]>().write_unaligned(value.to_be_bytes()) }
}

/// Writes `value` at `at` and returns what was there.
unsafe fn replace32(at: *mut u8, value: u32) -> u32 {
    // SAFETY: the caller checked the bounds.
    unsafe {
        let old = u32::from_be_bytes(at.cast::<[u8; 4]>().read_unaligned());
        at.cast::<[u8; 4]>().write_unaligned(value.to_be_bytes());
        old
    }
}

/// Writes `value` at `at` and returns what was there.
unsafe fn replace16(at: *mut u8, value: u16) -> u16 {
    // SAFETY: the caller checked the bounds.
    unsafe {
        let old = read16(at);
        write16(at, value);
        old
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
