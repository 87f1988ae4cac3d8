//! The kernel's socket table and its SYN-cookie helpers, as seen from XDP.

use core::{
    ffi::c_void,
    mem::{MaybeUninit, size_of},
};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple, tcphdr},
    helpers::generated::{
        bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie, bpf_tcp_gen_syncookie,
    },
    programs::XdpContext,
};

use crate::{
    frame::{at, read},
    parse::{Family, IPV6_HLEN, Segment, TCP_MIN_HLEN},
    zero,
};

/// `BPF_TCP_LISTEN` in `bpf_sock.state`.
const TCP_LISTEN: u32 = 10;
/// `BPF_TCP_NEW_SYN_RECV`: a request socket, a handshake the kernel answered and awaits the
/// ACK of.
const TCP_NEW_SYN_RECV: u32 = 12;
/// The cookie helpers read only the fixed IPv4 header (addresses), whatever IHL says.
const IPV4_HLEN: u32 = 20;

/// A socket found by `bpf_skc_lookup_tcp`: a listener, a full socket, a request socket or a
/// TIME-WAIT socket. The reference is released when this is dropped.
pub struct Socket(*mut bpf_sock);

impl Socket {
    /// The socket the kernel would deliver `segment` to, if any.
    #[inline(always)]
    pub fn lookup(ctx: &XdpContext, segment: &Segment) -> Option<Self> {
        let mut tuple = MaybeUninit::uninit();
        // SAFETY: bpf_sock_tuple is plain old data; all-zero is a valid value.
        let tuple: &mut bpf_sock_tuple = unsafe { zero::zeroed_in(&mut tuple) };
        let ports: [u8; 4] = read(ctx, segment.l4)?;
        let (sport, dport) = (
            u16::from_ne_bytes([ports[0], ports[1]]),
            u16::from_ne_bytes([ports[2], ports[3]]),
        );
        let tuple_size = match segment.family {
            Family::V4 => {
                let addresses: [u8; 8] = read(ctx, segment.l3 + 12)?;
                // SAFETY: writing plain integers into a union field of a zeroed tuple.
                unsafe {
                    let v4 = &mut tuple.__bindgen_anon_1.ipv4;
                    v4.saddr = u32::from_ne_bytes([
                        addresses[0],
                        addresses[1],
                        addresses[2],
                        addresses[3],
                    ]);
                    v4.daddr = u32::from_ne_bytes([
                        addresses[4],
                        addresses[5],
                        addresses[6],
                        addresses[7],
                    ]);
                    v4.sport = sport;
                    v4.dport = dport;
                    size_of_val(v4)
                }
            }
            Family::V6 => {
                let saddr: [[u8; 4]; 4] = read::<16>(ctx, segment.l3 + 8).map(words)?;
                let daddr: [[u8; 4]; 4] = read::<16>(ctx, segment.l3 + 24).map(words)?;
                // SAFETY: as above.
                unsafe {
                    let v6 = &mut tuple.__bindgen_anon_1.ipv6;
                    v6.saddr = saddr.map(u32::from_ne_bytes);
                    v6.daddr = daddr.map(u32::from_ne_bytes);
                    v6.sport = sport;
                    v6.dport = dport;
                    size_of_val(v6)
                }
            }
        };
        // SAFETY: the helper reads tuple_size bytes of the tuple; the returned reference is
        // owned by the Socket and released in Drop.
        let sk = unsafe {
            bpf_skc_lookup_tcp(
                ctx.as_ptr(),
                tuple,
                tuple_size as u32,
                BPF_F_CURRENT_NETNS as u64,
                0,
            )
        };
        if sk.is_null() { None } else { Some(Self(sk)) }
    }

    #[inline(always)]
    pub fn is_listener(&self) -> bool {
        // SAFETY: `state` is readable on every socket skc_lookup returns.
        unsafe { (*self.0).state == TCP_LISTEN }
    }

    /// A request socket: the kernel answered this 4-tuple's SYN itself.
    #[inline(always)]
    pub fn is_request(&self) -> bool {
        // SAFETY: as in is_listener.
        unsafe { (*self.0).state == TCP_NEW_SYN_RECV }
    }

    /// A kernel-compatible cookie for the SYN in `segment`, made with the listener's secret,
    /// and the MSS it encodes. `header` holds the SYN's TCP header (with its options, which the
    /// helper reads for the MSS); `header_len` is its length. The error is the helper's, or 0
    /// when the IP header is not in the frame (which the parser already made sure it is).
    #[inline(always)]
    pub fn syn_cookie(
        &self,
        ctx: &XdpContext,
        segment: &Segment,
        header: &mut [u8; 66],
        header_len: u32,
    ) -> Result<(u32, u16), i64> {
        let (ip, ip_len) = ip_header(ctx, segment).ok_or(0)?;
        // The length, re-bounded right at the call: Linux 6.12's verifier can lose the bounds
        // of a constant it fills from the stack ("REG INVARIANTS VIOLATION (ldx)") and then
        // refuses the helper's length as possibly negative. A volatile read hides the value
        // from LLVM, so the mask it would drop as redundant stays, and the verifier derives the
        // range 1..=64 from it afresh (header_len is 20..=60; the buffer holds 66 bytes).
        // SAFETY: a read of a local.
        let header_len =
            (unsafe { core::ptr::read_volatile(&header_len) }.wrapping_sub(1) & 0x3f) + 1;
        // SAFETY: ip points at ip_len bytes inside the frame; header holds header_len bytes.
        let value = unsafe {
            bpf_tcp_gen_syncookie(
                self.0.cast(),
                ip,
                ip_len,
                header.as_mut_ptr().cast::<tcphdr>(),
                header_len,
            )
        };
        if value < 0 {
            return Err(value);
        }
        Ok((value as u32, (value >> 32) as u16))
    }

    /// Whether the ACK in `segment` acknowledges a SYN cookie this listener issued recently.
    #[inline(always)]
    pub fn cookie_is_valid(&self, ctx: &XdpContext, segment: &Segment) -> bool {
        let Some((ip, ip_len)) = ip_header(ctx, segment) else {
            return false;
        };
        let Some(tcp) = at::<[u8; TCP_MIN_HLEN]>(ctx, segment.l4) else {
            return false;
        };
        // SAFETY: both pointers cover the lengths passed, inside the frame.
        unsafe {
            bpf_tcp_check_syncookie(
                self.0.cast(),
                ip,
                ip_len,
                tcp.cast::<tcphdr>(),
                TCP_MIN_HLEN as u32,
            ) == 0
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: self.0 is the reference skc_lookup returned, released exactly once.
        unsafe {
            bpf_sk_release(self.0.cast());
        }
    }
}

#[inline(always)]
fn ip_header(ctx: &XdpContext, segment: &Segment) -> Option<(*mut c_void, u32)> {
    match segment.family {
        Family::V4 => Some((
            at::<[u8; IPV4_HLEN as usize]>(ctx, segment.l3)?.cast(),
            IPV4_HLEN,
        )),
        Family::V6 => Some((
            at::<[u8; IPV6_HLEN]>(ctx, segment.l3)?.cast(),
            IPV6_HLEN as u32,
        )),
    }
}

#[inline(always)]
fn words(bytes: [u8; 16]) -> [[u8; 4]; 4] {
    let mut words = [[0u8; 4]; 4];
    let mut i = 0;
    while i < 4 {
        words[i] = [
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ];
        i += 1;
    }
    words
}

const _: () = assert!(size_of::<bpf_sock_tuple>() >= 36);
