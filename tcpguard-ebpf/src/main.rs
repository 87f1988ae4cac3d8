//! tcpguard's data plane.
//!
//! XDP, on ingress: dissect and protected port? (in a plain frame the port is read and its entry
//! in the port table with it first, in any other after the dissection; once either way) → validate → source policy → SYN, tracked flow, ACK (a FIN or data with it included), or RST.
//! Every path ends in exactly one [`Counter`], and the counter's kind is the verdict.
//!
//! TC, on egress: the server's segments of tracked flows refresh them and report the ones that
//! change a connection's state. It never changes a verdict.
#![no_std]
#![no_main]
// The atomic add of `attack`: the BPF target has no `AtomicU64`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod attack;
mod clock;
mod flow;
mod frame;
mod host;
mod integrity;
mod own_cookie;
mod parse;
mod policy;
mod rare;
mod socket;
mod syn;
mod validate;
mod zero;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action},
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use tcpguard_common::{
    Counter, CounterKind, EventKind, FAMILY_IPV4, FAMILY_IPV6, FlowKey, SynCookieConfig,
    tcp_flags::{ACK, RST, SYN},
};
use tcpguard_ebpf::ports::Ports;

use crate::{
    attack::Cookies,
    flow::{Direction, KernelSocket, SynClock},
    parse::{Family, Segment},
    policy::Lists,
    socket::Socket,
};

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Global data, not a map: see [`tcpguard_common::PortTable`]. The section's name is the map's
/// ([`tcpguard_common::maps::PROTECTED_PORTS`]).
#[unsafe(link_section = ".bss.ports")]
static PROTECTED_PORTS: Ports = Ports::new();

#[map(name = "SYN_COOKIE_CONFIG")]
static SYN_COOKIE_CONFIG: Array<SynCookieConfig> = Array::with_max_entries(1, 0);

/// The segment a SYN handler works on, passed through memory the verifier cannot see into; see
/// [`handle_syn`].
#[map(name = "SYN_SCRATCH")]
static SYN_SCRATCH: PerCpuArray<Segment> = PerCpuArray::with_max_entries(1, 0);

// `#[xdp]` wraps each function below in the program's entry point; inlined there, the verdict
// is the entry point's own body rather than a BPF-to-BPF call every packet pays for.

/// Answers SYNs with the kernel's cookies (listener-mode helpers).
#[xdp]
#[inline(always)]
pub fn tcpguard(ctx: XdpContext) -> u32 {
    verdict::<false>(&ctx)
}

/// Answers SYNs with tcpguard's own cookies; accepted ACKs go on to the TC ingress program.
#[xdp]
#[inline(always)]
pub fn tcpguard_own(ctx: XdpContext) -> u32 {
    verdict::<true>(&ctx)
}

/// `OWN`: the cookie mode, fixed per program so that the verifier checks one cookie path.
#[inline(always)]
fn verdict<const OWN: bool>(ctx: &XdpContext) -> u32 {
    let counter = judge::<OWN>(ctx);
    count(counter);
    match counter.kind() {
        CounterKind::Pass => xdp_action::XDP_PASS,
        CounterKind::Answer => xdp_action::XDP_TX,
        CounterKind::Drop => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn judge<const OWN: bool>(ctx: &XdpContext) -> Counter {
    // Most frames are plain: their port is read first, and traffic to other ports passes before
    // the rest of the dissection. Other frames are dissected to their port first. Either way
    // the port's entry is read once; it holds the interface's MAC too.
    let (segment, interface_mac) = match parse::plain(ctx) {
        Some(plain) => match protected_port(plain.dport, plain.family) {
            Some(mac) => (parse::plain_segment(ctx, plain), mac),
            None => return Counter::Unprotected,
        },
        None => match parse::segment(ctx) {
            Ok(segment) => match protected_port(segment.dport, segment.family) {
                Some(mac) => (Ok(segment), mac),
                None => return Counter::Unprotected,
            },
            Err(counter) => return counter,
        },
    };
    let segment = match segment {
        Ok(segment) => segment,
        Err(counter) => return counter,
    };
    if let Err(counter) = host::frame_for_interface(ctx, &interface_mac) {
        return counter;
    }
    if is_tracked::<OWN>(ctx, &segment) {
        return Counter::TrackedFlow;
    }
    let Some(key) = flow::key(ctx, &segment, Direction::FromClient) else {
        return Counter::Truncated;
    };
    if let Err(counter) = host::owns_destination(key) {
        return counter;
    }
    if let Err(counter) = validate::segment(&segment) {
        return counter;
    }
    let policy = policy::lists();
    if policy.denied(key) {
        return Counter::DeniedSource;
    }
    let flags = segment.flags;
    if flags & (SYN | ACK) == SYN {
        handle_syn::<OWN>(ctx, &segment, key, policy)
    } else if flags & RST != 0 {
        handle_rst(ctx, &segment)
    } else {
        handle_ack::<OWN>(ctx, &segment, key)
    }
}

/// A segment of a connection tcpguard tracks, refreshing it: the path of every data segment,
/// so it is the short one. The connection's first segment passed the host checks that
/// [`judge`] makes of the rest (its addresses) and the deny list; the segment's own flags are
/// checked again. A change of the deny list reaches tracked connections through the daemon,
/// which removes the flows of clients it denies (their segments are then judged, and dropped).
/// A bare SYN is always judged as one.
///
/// A connection opened by one of tcpguard's own cookies is tracked from the ACK that returned
/// it, which the kernel may still drop; until a segment finds the socket the kernel built,
/// each is judged as untracked, so that it returns the cookie and builds the socket instead.
#[inline(always)]
fn is_tracked<const OWN: bool>(ctx: &XdpContext, segment: &Segment) -> bool {
    if segment.flags & (SYN | ACK) == SYN || validate::segment(segment).is_err() {
        return false;
    }
    if OWN {
        let socket_built =
            || Socket::lookup(ctx, segment).is_some_and(|socket| !socket.is_listener());
        flow::track_built(ctx, segment, socket_built).is_some()
    } else {
        flow::track(ctx, segment, Direction::FromClient).is_some()
    }
}

/// The MAC of the interface `port` is protected on, when it is protected for `family`.
#[inline(always)]
fn protected_port(port: u16, family: Family) -> Option<[u8; 6]> {
    let family = match family {
        Family::V4 => FAMILY_IPV4,
        Family::V6 => FAMILY_IPV6,
    };
    (PROTECTED_PORTS.families(port) & family != 0).then(|| PROTECTED_PORTS.interface_mac(port))
}

/// A SYN: allow-listed sources go straight to the kernel and are tracked from here; sources at
/// their connection limit are dropped; the rest are answered with a cookie when a listener is
/// there, else left to the kernel.
///
/// In [`answer_syn`], the segment goes through a per-CPU scratch slot first. Read back, its offsets are bounded
/// unknowns to the verifier instead of one exact value per header layout (VLAN tags, IPv4
/// options, IPv6 extension headers), so it checks the SYN path, the longest one, once rather
/// than once per layout; without this the program exceeds the verifier's 1M-instruction budget.
#[inline(always)]
fn handle_syn<const OWN: bool>(
    ctx: &XdpContext,
    segment: &Segment,
    key: &FlowKey,
    policy: Lists,
) -> Counter {
    let cookies = attack::syn_seen();
    if policy.allowed(key) {
        if flow::track_key(key, segment).is_none() {
            flow::start(
                key,
                segment,
                EventKind::AllowedSyn,
                SynClock::Monotonic,
                KernelSocket::Certain,
            );
        }
        return Counter::AllowedSource;
    }
    if policy.source_full(key) {
        return Counter::SourceLimit;
    }
    if let Err(counter) = host::source_is_foreign(key) {
        return counter;
    }
    // One clock read serves the cookie and the handshake timer.
    let clock_ns = syn_clock_ns::<OWN>();
    if let Cookies::Leave = cookies {
        // Outside an attack the kernel answers, as without tcpguard; the connection is tracked
        // from the ACK that completes its handshake.
        flow::syn_answered(key, clock_ns);
        return Counter::SynNoAttack;
    }
    let counter = answer_syn::<OWN>(ctx, segment, key, clock_ns);
    if counter == Counter::SynCookieSent {
        flow::syn_answered(key, clock_ns);
    }
    counter
}

/// The clock a program times handshakes on: TAI for an own cookie, the monotonic clock the
/// kernel's cookie timestamps count for the kernel's.
#[inline(always)]
fn syn_clock_ns<const OWN: bool>() -> u64 {
    if OWN {
        own_cookie::now_tai_ns()
    } else {
        flow::now_ns()
    }
}

/// See [`handle_syn`].
#[inline(always)]
fn answer_syn<const OWN: bool>(
    ctx: &XdpContext,
    segment: &Segment,
    key: &FlowKey,
    clock_ns: u64,
) -> Counter {
    let Some(slot) = SYN_SCRATCH.get_ptr_mut(0) else {
        return Counter::CookieUnavailable;
    };
    // SAFETY: a per-CPU slot, used only within this invocation; volatile so that LLVM does not
    // forward the stored values past the load.
    let segment = unsafe {
        slot.write_volatile(*segment);
        slot.read_volatile()
    };
    let Some(segment) = segment.bounded() else {
        return Counter::Truncated;
    };
    let segment = &segment;
    let Some(socket) = Socket::lookup(ctx, segment) else {
        return Counter::NoListener;
    };
    if !socket.is_listener() {
        // A SYN for an existing 4-tuple (TIME-WAIT reuse, a retransmission): the kernel's.
        return Counter::KnownSocket;
    }
    let Some(config) = SYN_COOKIE_CONFIG.get(0) else {
        return Counter::CookieUnavailable;
    };
    syn::answer::<OWN>(ctx, segment, key, &socket, config, clock_ns)
}

/// An ACK (or SYN-ACK) of an untracked flow with no connection behind it must carry a valid
/// cookie; the connection it opens is tracked from then on. Any ACK may: data or a FIN with it
/// completes a handshake whose pure ACK was lost, as the kernel lets it. Connections the
/// kernel already has (opened before tcpguard started, say) pass on the kernel's word.
#[inline(always)]
fn handle_ack<const OWN: bool>(ctx: &XdpContext, segment: &Segment, key: &FlowKey) -> Counter {
    match Socket::lookup(ctx, segment) {
        None => Counter::NoConnection,
        Some(socket) if socket.is_request() && segment.flags & (SYN | ACK) == ACK => {
            let clock = if OWN {
                SynClock::Tai(syn_clock_ns::<OWN>())
            } else {
                SynClock::Monotonic
            };
            flow::start(
                key,
                segment,
                EventKind::KernelHandshake,
                clock,
                KernelSocket::Certain,
            );
            Counter::KernelHandshake
        }
        Some(socket) if !socket.is_listener() => Counter::KnownSocket,
        Some(_) if OWN => match SYN_COOKIE_CONFIG.get(0) {
            Some(config) => own_cookie::check_ack(ctx, segment, key, config),
            None => Counter::CookieUnavailable,
        },
        Some(listener) if listener.cookie_is_valid(ctx, segment) => {
            flow::start(
                key,
                segment,
                EventKind::CookieHandshake,
                SynClock::Monotonic,
                KernelSocket::Certain,
            );
            Counter::CookieAccepted
        }
        Some(_) => Counter::CookieRejected,
    }
}

/// A RST means something only to a connection that exists. (A FIN, which has an ACK once it
/// passed [`validate`], may complete a handshake whose pure ACK was lost: [`handle_ack`]
/// judges it.)
#[inline(always)]
fn handle_rst(ctx: &XdpContext, segment: &Segment) -> Counter {
    match Socket::lookup(ctx, segment) {
        Some(socket) if !socket.is_listener() => Counter::KnownSocket,
        _ => Counter::NoConnection,
    }
}

#[classifier]
pub fn tcpguard_egress(ctx: TcContext) -> i32 {
    observe_egress(&ctx);
    // TCX_NEXT / TC_ACT_UNSPEC: the verdict is left to whatever comes next.
    TC_ACT_UNSPEC
}

/// A segment the server sends on a tracked flow refreshes it and may be reported.
#[inline(always)]
fn observe_egress(ctx: &TcContext) {
    let Ok(segment) = parse::segment(ctx) else {
        return;
    };
    if segment.fragment {
        return;
    }
    let _ = flow::track(ctx, &segment, Direction::FromServer);
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: a per-CPU slot, written only by this CPU.
        unsafe { *value += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The SYN-cookie helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
