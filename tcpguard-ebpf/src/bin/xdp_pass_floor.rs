//! Benchmark only: the floors of the two paths that pass a segment on, for `bench xdp`.
//! `xdp_pass_unprotected` dissects an untagged IPv4 TCP frame at fixed offsets and reads its
//! destination port's entry in a global-data port table, as tcpguard's protected-port check
//! does;
//! `xdp_pass_tracked` dissects it the same way and looks its 4-tuple up in an LRU hash map with
//! tcpguard's IPv4 flow key. Each passes the segment when the lookup says tcpguard would (an
//! unprotected port, a tracked flow) and drops it otherwise, so the lookup decides the verdict.
//! Nothing else: no VLAN tags, IPv4 options or IPv6, no length checks, no counters.

#![no_std]
#![no_main]

use core::borrow::Borrow;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::LruHashMap,
    programs::XdpContext,
};
use tcpguard_common::{DEFAULT_FLOW_CAPACITY, Flow, FlowKeyV4};
use tcpguard_ebpf::ports::Ports;

#[unsafe(link_section = ".bss.ports")]
static PORTS: Ports = Ports::new();

#[map]
static FLOWS_V4: LruHashMap<FlowKeyV4, Flow> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_CAPACITY, 0);

const IP: usize = 14;
const TCP: usize = IP + 20;

#[xdp]
pub fn xdp_pass_unprotected(ctx: XdpContext) -> u32 {
    let Some(frame) = tcp_frame(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: inside the frame, checked by tcp_frame.
    let port = unsafe { u16::from_be_bytes([*frame.add(TCP + 2), *frame.add(TCP + 3)]) };
    if PORTS.families(port) != 0 {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

#[xdp]
pub fn xdp_pass_tracked(ctx: XdpContext) -> u32 {
    let Some(frame) = tcp_frame(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: inside the frame, checked by tcp_frame.
    let key = unsafe {
        let at = |offset: usize| *frame.add(offset);
        Aligned(FlowKeyV4 {
            client_addr: [at(IP + 12), at(IP + 13), at(IP + 14), at(IP + 15)],
            server_addr: [at(IP + 16), at(IP + 17), at(IP + 18), at(IP + 19)],
            client_port: u16::from_be_bytes([at(TCP), at(TCP + 1)]),
            server_port: u16::from_be_bytes([at(TCP + 2), at(TCP + 3)]),
        })
    };
    if FLOWS_V4.get_ptr(key).is_none() {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

/// The key on the stack, 8-aligned as tcpguard's: the verifier refuses an 8-byte stack access
/// that is not.
#[repr(C, align(8))]
struct Aligned(FlowKeyV4);

impl Borrow<FlowKeyV4> for Aligned {
    #[inline(always)]
    fn borrow(&self) -> &FlowKeyV4 {
        &self.0
    }
}

/// The frame, when it is untagged IPv4 without options carrying TCP with a whole header.
#[inline(always)]
fn tcp_frame(ctx: &XdpContext) -> Option<*const u8> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + TCP + 20 > end {
        return None;
    }
    let frame = start as *const u8;
    // SAFETY: every offset below is under TCP + 20, checked against data_end above.
    let byte = |offset: usize| unsafe { *frame.add(offset) };
    if byte(12) != 0x08 || byte(13) != 0x00 || byte(IP) != 0x45 || byte(IP + 9) != 6 {
        return None;
    }
    Some(frame)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
