//! Test only: stands in for tcpguard's XDP program on an accepted own-cookie ACK, so that the
//! TC ingress program `tcpguard_reqsk` can be tested on its own. While the loader has written a
//! record into `RECORD`, every untagged IPv4 TCP segment with ACK as its only flag gets that
//! record in front of it as XDP metadata, as tcpguard's XDP program will hand it on.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_meta, macros::map, macros::xdp,
    maps::Array, programs::XdpContext,
};
use tcpguard_common::{COOKIE_ACK_LEN, COOKIE_ACK_MAGIC, CookieAck};

/// The record to hand on; a zero magic (the default) hands on nothing.
#[map]
static RECORD: Array<CookieAck> = Array::with_max_entries(1, 0);

const IP: usize = 14;
const TCP_ACK: u8 = 0x10;

#[xdp]
pub fn xdp_cookie_ack(ctx: XdpContext) -> u32 {
    let Some(record) = RECORD.get(0) else {
        return xdp_action::XDP_PASS;
    };
    if record.magic != COOKIE_ACK_MAGIC || !is_bare_ipv4_ack(&ctx) {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the context is the one the kernel passed.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(COOKIE_ACK_LEN as i32)) } != 0 {
        return xdp_action::XDP_PASS;
    }
    let meta = ctx.metadata();
    if meta + COOKIE_ACK_LEN > ctx.data() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the verifier-checked bound above covers the record's bytes.
    unsafe { core::ptr::write_unaligned(meta as *mut CookieAck, *record) };
    xdp_action::XDP_PASS
}

fn is_bare_ipv4_ack(ctx: &XdpContext) -> bool {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + IP + 20 > end {
        return false;
    }
    // SAFETY: bounds-checked against data_end just above.
    let byte = |offset: usize| unsafe { *((start + offset) as *const u8) };
    if byte(12) != 0x08 || byte(13) != 0x00 || byte(IP + 9) != 6 {
        return false;
    }
    let tcp = IP + usize::from(byte(IP) & 0x0f) * 4;
    if !(IP + 20..=IP + 60).contains(&tcp) || start + tcp + 20 > end {
        return false;
    }
    // SAFETY: as above.
    unsafe { *((start + tcp + 13) as *const u8) == TCP_ACK }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
