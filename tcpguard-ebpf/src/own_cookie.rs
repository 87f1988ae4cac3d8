//! tcpguard's own cookie (`tcpguard_common::cookie`) on the data plane: the SYN-ACK it answers
//! with, and the check of the ACK that returns it. An accepted ACK carries the decoded options
//! to the TC ingress program in the XDP metadata area (`tcpguard_common::CookieAck`), and that
//! program has the kernel build the socket (`bpf_sk_assign_tcp_reqsk`), with every option the
//! SYN-ACK agreed to, timestamps or not, and the host's sysctls untouched.

use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_ktime_get_tai_ns, bpf_xdp_adjust_meta},
    macros::map,
    maps::Array,
    programs::XdpContext,
};
use tcpguard_common::{
    COOKIE_ACK_ECN, COOKIE_ACK_LEN, COOKIE_ACK_MAGIC, COOKIE_ACK_SACK, COOKIE_ACK_TIMESTAMPS,
    COOKIE_ACK_WSCALE, CookieAck, Counter, EventKind, FLOW_IPV6, FlowKey, NO_WINDOW_SCALE,
    SynCookieConfig,
    cookie::{self, CookieOptions, CookieReject, CookieSecrets, WSCALE_NONE},
    tcp::{Header, SynAckPlan, TcpOptions},
    tcp_flags::{CWR, ECE},
};

use crate::{
    flow::{self, KernelSocket, SynClock},
    parse::Segment,
    rare, syn, zero,
};

#[map(name = "COOKIE_SECRETS")]
static COOKIE_SECRETS: Array<CookieSecrets> = Array::with_max_entries(1, 0);

/// The keys, once the daemon has written them: an all-zero key is public, so generation 0
/// means "no key yet" and nothing is answered or accepted.
#[inline(always)]
fn secrets<'a>() -> Option<&'a CookieSecrets> {
    COOKIE_SECRETS
        .get(0)
        .filter(|secrets| secrets.generation != 0)
}

/// TAI nanoseconds: the clock the hosts sharing a key agree on (CLOCK_MONOTONIC is per host).
#[inline(always)]
pub fn now_tai_ns() -> u64 {
    // SAFETY: no arguments, no side effects.
    unsafe { bpf_ktime_get_tai_ns() }
}

const NS_PER_S: u64 = 1_000_000_000;

/// The SYN-ACK answering a SYN with `options` at `tai_ns`: every option both ends support
/// survives, since the cookie carries them in the ISN.
#[inline(always)]
pub fn plan(
    segment: &Segment,
    key: &FlowKey,
    options: &TcpOptions,
    config: &SynCookieConfig,
    tai_ns: u64,
) -> Option<SynAckPlan> {
    let secrets = secrets()?;
    let scales = config.window_scale != NO_WINDOW_SCALE && options.window_scale != NO_WINDOW_SCALE;
    let agreed = CookieOptions {
        mss_index: cookie::mss_index(key.family, options.mss),
        window_scale: if scales {
            options.window_scale
        } else {
            WSCALE_NONE
        },
        sack: options.sack_permitted && config.sack != 0,
        ecn: segment.flags & (ECE | CWR) == ECE | CWR && config.ecn != 0,
        timestamps: options.has_timestamp && config.timestamps != 0,
    };
    let made = cookie::make(secrets, tai_ns / NS_PER_S, key, segment.seq, agreed);
    let ipv6_extra = if key.family == FLOW_IPV6 { 20 } else { 0 };
    Some(SynAckPlan {
        options: options.any,
        isn: made.isn,
        mss: config.mss.saturating_sub(ipv6_extra),
        window_scale: if scales {
            config.window_scale
        } else {
            NO_WINDOW_SCALE
        },
        sack: agreed.sack,
        timestamps: agreed.timestamps,
        tsval: made.tsval,
        tsecr: options.timestamp,
        ecn: agreed.ecn,
    })
}

/// An ACK to a listener, with no connection behind it: it must return one of tcpguard's own
/// cookies. Accepted, it goes to the kernel with its [`CookieAck`] and is tracked from here.
#[inline(always)]
pub fn check_ack(
    ctx: &XdpContext,
    segment: &Segment,
    key: &FlowKey,
    config: &SynCookieConfig,
) -> Counter {
    let Some(secrets) = secrets() else {
        return Counter::CookieRejected;
    };
    let mut header = core::mem::MaybeUninit::uninit();
    // SAFETY: a byte array; all-zero is a valid value.
    let header: &mut Header = unsafe { zero::zeroed_in(&mut header) };
    let header_len = match syn::load_header(ctx, segment, header) {
        Ok(len) => len,
        Err(counter) => return counter,
    };
    let options = syn::tcp_options(header, header_len as usize);
    let tai_ns = now_tai_ns();
    let agreed = match cookie::check(
        secrets,
        tai_ns / NS_PER_S,
        key,
        segment.seq,
        segment.ack,
        options.has_timestamp,
        options.timestamp_echo,
    ) {
        Ok(agreed) => agreed,
        Err(CookieReject::Hash) => return Counter::CookieRejected,
        Err(CookieReject::Timestamp) => return Counter::CookieBadTimestamp,
        Err(CookieReject::RetiredKey) => return Counter::CookieRetiredKey,
    };
    let record = cookie_ack(key, &agreed, &options, config);
    if let Err(error) = hand_over(ctx, &record) {
        rare::handover_failed(key, error);
        return Counter::CookieHandoverFailed;
    }
    // A segment returning the cookie again (the kernel dropped the first) refreshes the flow
    // that one started.
    if flow::track_key(key, segment).is_none() {
        flow::start(
            key,
            segment,
            EventKind::CookieHandshake,
            SynClock::Tai(tai_ns),
            KernelSocket::Awaited,
        );
    }
    Counter::CookieAccepted
}

/// The attributes the kernel builds the socket from.
#[inline(always)]
fn cookie_ack(
    key: &FlowKey,
    agreed: &CookieOptions,
    options: &TcpOptions,
    config: &SynCookieConfig,
) -> CookieAck {
    let scales = agreed.window_scale != WSCALE_NONE;
    let mut flags = 0;
    if agreed.ecn {
        flags |= COOKIE_ACK_ECN;
    }
    if scales {
        flags |= COOKIE_ACK_WSCALE;
    }
    if agreed.sack {
        flags |= COOKIE_ACK_SACK;
    }
    if agreed.timestamps {
        flags |= COOKIE_ACK_TIMESTAMPS;
    }
    CookieAck {
        magic: COOKIE_ACK_MAGIC,
        rcv_tsval: options.timestamp,
        rcv_tsecr: options.timestamp_echo,
        mss: cookie::mss_of(key.family, agreed.mss_index),
        // The scale the SYN-ACK advertised: the kernel takes it as given.
        rcv_wscale: if scales { config.window_scale } else { 0 },
        snd_wscale: if scales { agreed.window_scale } else { 0 },
        flags,
        _pad: [0; 3],
    }
}

/// Puts `record` in the metadata area in front of the packet, where TC ingress finds it. The
/// error is the helper's, or 0 when the area it made is not where the verifier can see it.
#[inline(always)]
fn hand_over(ctx: &XdpContext, record: &CookieAck) -> Result<(), i64> {
    // SAFETY: growing the metadata area invalidates packet pointers; none are held past here.
    let error = unsafe { bpf_xdp_adjust_meta(ctx.as_ptr().cast(), -(COOKIE_ACK_LEN as i32)) };
    if error != 0 {
        return Err(error);
    }
    let meta = ctx.metadata();
    if meta + COOKIE_ACK_LEN > ctx.data() {
        return Err(0);
    }
    // SAFETY: the check above keeps the record inside the metadata area.
    unsafe { (meta as *mut CookieAck).write_unaligned(*record) };
    Ok(())
}
