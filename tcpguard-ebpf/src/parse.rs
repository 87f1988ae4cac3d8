//! Dissection: Ethernet (up to two VLAN tags) → IPv4 or IPv6 (bounded extension-header walk) →
//! TCP. Structural faults that the kernel would drop anyway are dropped here, whatever the port,
//! when they come before the port; anything that is not TCP passes. The common frame (untagged,
//! IPv4 without options or IPv6 without extension headers) has its port read first
//! ([`plain`]), so that traffic to other ports passes after a few loads.

use tcpguard_common::Counter;

use crate::frame::{Frame, be16_at, len, read};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

const IPPROTO_TCP: u8 = 6;

// Offsets of the header fields that both the plain-frame check and the dissection read.
const ETH_TYPE: usize = 12;
const IPV4_FRAGMENT: usize = 6;
const IPV4_PROTOCOL: usize = 9;
const IPV6_NEXT_HEADER: usize = 6;
const TCP_DPORT: usize = 2;
/// IPv4's first byte without options: version 4, IHL 5.
const IPV4_PLAIN_FIRST_BYTE: u8 = 0x45;
const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const TCP_MIN_HLEN: usize = 20;

/// IPv4 flag "more fragments" and the fragment offset mask.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;

/// How many IPv6 extension headers are walked before a packet is given up on. Real traffic
/// rarely carries more than two; a longer chain goes to the kernel unjudged, since its port is
/// unknown.
const MAX_IPV6_EXTENSION_HEADERS: usize = 6;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Where a TCP segment lies in the frame and what its fixed header says.
#[derive(Clone, Copy)]
pub struct Segment {
    pub family: Family,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP header.
    pub l4: usize,
    /// Length of the TCP segment (header and payload) as the IP header gives it.
    pub l4_len: usize,
    /// The first fragment of a fragmented datagram.
    pub fragment: bool,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// TCP data offset, in 32-bit words.
    pub data_offset: u8,
}

/// Offsets beyond these are not produced by [`segment`]: two VLAN tags, and six IPv6 extension
/// headers of at most 2 KiB each.
const MAX_L3_OFFSET: usize = ETH_HLEN + 8;
const MAX_L4_OFFSET: usize = MAX_L3_OFFSET + IPV6_HLEN + MAX_IPV6_EXTENSION_HEADERS * 2048;
/// The smallest all-ones masks that keep every offset up to those limits.
const MAX_L3_OFFSET_MASK: usize = MAX_L3_OFFSET.next_power_of_two() - 1;
const MAX_L4_OFFSET_MASK: usize = MAX_L4_OFFSET.next_power_of_two() - 1;

impl Segment {
    /// The same segment with its offsets checked against their limits, for code that receives
    /// a segment the verifier knows nothing about.
    ///
    /// The offsets handed on are masked copies of the checked ones, not the checked values
    /// themselves: LLVM may spill an offset to the stack before the check, and Linux 6.1's
    /// verifier keeps no spilled scalar that had no bounds when it was spilled (6.12's does, and
    /// applies the check to it), so the reloaded offset was unbounded there and the packet
    /// access the program was refused for. A mask gives each copy its range wherever it is
    /// reloaded from; the mask changes no value that passed the check, and a volatile read
    /// keeps LLVM from dropping it as redundant.
    #[inline(always)]
    pub fn bounded(self) -> Option<Self> {
        if !(self.l3 <= MAX_L3_OFFSET && self.l4 <= MAX_L4_OFFSET && self.l4_len <= 0xffff) {
            return None;
        }
        // SAFETY: reads of locals.
        let hide = |value: usize| unsafe { core::ptr::read_volatile(&value) };
        Some(Self {
            l3: hide(self.l3) & MAX_L3_OFFSET_MASK,
            l4: hide(self.l4) & MAX_L4_OFFSET_MASK,
            l4_len: hide(self.l4_len) & 0xffff,
            ..self
        })
    }

    /// TCP payload bytes: what follows the header, options included.
    #[inline(always)]
    pub fn payload_len(&self) -> u16 {
        (self.l4_len as u16).wrapping_sub(u16::from(self.data_offset) * 4)
    }

    /// Length of the IP header tcpguard writes when it answers (options and extension headers
    /// are not echoed).
    pub fn answer_l3_len(&self) -> usize {
        match self.family {
            Family::V4 => IPV4_MIN_HLEN,
            Family::V6 => IPV6_HLEN,
        }
    }
}

/// The TCP segment in the frame, or the counter that says why there is none to judge.
#[inline(always)]
pub fn segment(ctx: &impl Frame) -> Result<Segment, Counter> {
    let (ethertype, l3) = ethernet(ctx)?;
    match ethertype {
        ETH_P_IP => ipv4(ctx, l3),
        ETH_P_IPV6 => ipv6(ctx, l3),
        _ => Err(Counter::NotIp),
    }
}

/// An untagged frame whose TCP header directly follows a fixed-size IP header: IPv4 without
/// options (not a later fragment), or IPv6 without extension headers. Most traffic comes in such
/// frames.
#[derive(Clone, Copy)]
pub struct Plain {
    pub family: Family,
    pub dport: u16,
}

/// The frame as a [`Plain`] one, its destination port read at fixed offsets before anything else
/// is checked; `None` for any other frame. Traffic to a port tcpguard does not protect passes on
/// this alone, without the rest of the dissection: a fault it would have found (a length past
/// the frame, a header cut short) is the kernel's to drop, as without tcpguard.
#[inline(always)]
pub fn plain(ctx: &impl Frame) -> Option<Plain> {
    const V4_L4: usize = ETH_HLEN + IPV4_MIN_HLEN;
    const V6_L4: usize = ETH_HLEN + IPV6_HLEN;
    // IPv4 first, the most common, in one read that covers its ports.
    let frame: [u8; V4_L4 + 4] = read(ctx, 0)?;
    let ethertype = be16(&frame, ETH_TYPE);
    if ethertype == ETH_P_IP {
        let ip = ETH_HLEN;
        let fragment = be16(&frame, ip + IPV4_FRAGMENT);
        let plain = frame[ip] == IPV4_PLAIN_FIRST_BYTE
            && frame[ip + IPV4_PROTOCOL] == IPPROTO_TCP
            && fragment & IP_OFFSET == 0;
        return plain.then(|| Plain {
            family: Family::V4,
            dport: be16(&frame, V4_L4 + TCP_DPORT),
        });
    }
    if ethertype != ETH_P_IPV6 {
        return None;
    }
    let frame: [u8; V6_L4 + 4] = read(ctx, 0)?;
    let plain = frame[ETH_HLEN] >> 4 == 6 && frame[ETH_HLEN + IPV6_NEXT_HEADER] == IPPROTO_TCP;
    plain.then(|| Plain {
        family: Family::V6,
        dport: be16(&frame, V6_L4 + TCP_DPORT),
    })
}

/// The big-endian 16-bit field at `at` of header bytes already read.
#[inline(always)]
fn be16<const N: usize>(bytes: &[u8; N], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// [`segment`] for a frame [`plain`] read a port from.
#[inline(always)]
pub fn plain_segment(ctx: &impl Frame, plain: Plain) -> Result<Segment, Counter> {
    match plain.family {
        // plain saw version 4 and no options: the TCP header's offset is a constant.
        Family::V4 => {
            let header: [u8; IPV4_MIN_HLEN] = read(ctx, ETH_HLEN).ok_or(Counter::Truncated)?;
            ipv4_datagram(ctx, ETH_HLEN, &header, IPV4_MIN_HLEN)
        }
        Family::V6 => ipv6(ctx, ETH_HLEN),
    }
}

/// The innermost EtherType and the offset of the header it announces.
#[inline(always)]
fn ethernet(ctx: &impl Frame) -> Result<(u16, usize), Counter> {
    let mut ethertype = be16_at(ctx, ETH_TYPE).ok_or(Counter::Truncated)?;
    let mut l3 = ETH_HLEN;
    // Two tags at most: 802.1ad outer and 802.1Q inner (QinQ). Each is TPID + TCI, and the
    // EtherType that follows the tag is the next one to look at.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = be16_at(ctx, l3 + 2).ok_or(Counter::Truncated)?;
        l3 += 4;
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = be16_at(ctx, l3 + 2).ok_or(Counter::Truncated)?;
            l3 += 4;
        }
    }
    Ok((ethertype, l3))
}

#[inline(always)]
fn ipv4(ctx: &impl Frame, l3: usize) -> Result<Segment, Counter> {
    let header: [u8; IPV4_MIN_HLEN] = read(ctx, l3).ok_or(Counter::Truncated)?;
    if header[0] >> 4 != 4 {
        return Err(Counter::BadIpVersion);
    }
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header_len < IPV4_MIN_HLEN {
        return Err(Counter::BadIpHeaderLength);
    }
    ipv4_datagram(ctx, l3, &header, header_len)
}

/// The TCP segment in the IPv4 datagram at `l3`, whose fixed `header` (version checked) says
/// it is `header_len` bytes long.
#[inline(always)]
fn ipv4_datagram(
    ctx: &impl Frame,
    l3: usize,
    header: &[u8; IPV4_MIN_HLEN],
    header_len: usize,
) -> Result<Segment, Counter> {
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    // A frame may carry padding after the datagram, never less than the datagram.
    if total_len < header_len || l3 + total_len > len(ctx) {
        return Err(Counter::BadIpTotalLength);
    }
    if header[IPV4_PROTOCOL] != IPPROTO_TCP {
        return Err(Counter::NotTcp);
    }
    let fragment = be16(header, IPV4_FRAGMENT);
    if fragment & IP_OFFSET != 0 {
        return Err(Counter::LaterFragment);
    }
    tcp(
        ctx,
        Family::V4,
        l3,
        l3 + header_len,
        total_len - header_len,
        fragment & IP_MF != 0,
    )
}

#[inline(always)]
fn ipv6(ctx: &impl Frame, l3: usize) -> Result<Segment, Counter> {
    let header: [u8; 8] = read(ctx, l3).ok_or(Counter::Truncated)?;
    if header[0] >> 4 != 6 {
        return Err(Counter::BadIpVersion);
    }
    let payload_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let end = l3 + IPV6_HLEN + payload_len;
    if end > len(ctx) {
        return Err(Counter::BadIpTotalLength);
    }
    let mut next = header[IPV6_NEXT_HEADER];
    let mut l4 = l3 + IPV6_HLEN;
    let mut fragment = false;
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        match next {
            IPPROTO_TCP => break,
            NEXTHDR_HOP | NEXTHDR_DEST => {
                let ext: [u8; 2] = read(ctx, l4).ok_or(Counter::Truncated)?;
                next = ext[0];
                l4 += (usize::from(ext[1]) + 1) * 8;
            }
            NEXTHDR_ROUTING => {
                let ext: [u8; 4] = read(ctx, l4).ok_or(Counter::Truncated)?;
                // Segments left: the packet is on its way to another node, which the kernel
                // forwards it to (or drops); it is not for a local socket.
                if ext[3] != 0 {
                    return Err(Counter::SourceRouted);
                }
                next = ext[0];
                l4 += (usize::from(ext[1]) + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let ext: [u8; 2] = read(ctx, l4).ok_or(Counter::Truncated)?;
                next = ext[0];
                l4 += (usize::from(ext[1]) + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let ext: [u8; 8] = read(ctx, l4).ok_or(Counter::Truncated)?;
                let offset_and_more = u16::from_be_bytes([ext[2], ext[3]]);
                if offset_and_more & 0xfff8 != 0 {
                    return Err(Counter::LaterFragment);
                }
                // Any Fragment header with more to come makes the datagram a fragment, not only
                // the last one in the chain.
                fragment |= offset_and_more & 1 != 0;
                next = ext[0];
                l4 += 8;
            }
            _ => return Err(Counter::NotTcp),
        }
    }
    match next {
        IPPROTO_TCP if l4 <= end => tcp(ctx, Family::V6, l3, l4, end - l4, fragment),
        IPPROTO_TCP => Err(Counter::BadIpTotalLength),
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT => {
            Err(Counter::ExtensionHeaderChain)
        }
        _ => Err(Counter::NotTcp),
    }
}

#[inline(always)]
fn tcp(
    ctx: &impl Frame,
    family: Family,
    l3: usize,
    l4: usize,
    l4_len: usize,
    fragment: bool,
) -> Result<Segment, Counter> {
    // A first fragment may end inside the TCP header; it is still judged by its port.
    if fragment {
        let ports: [u8; 4] = read(ctx, l4).ok_or(Counter::Truncated)?;
        return Ok(Segment {
            family,
            l3,
            l4,
            l4_len,
            fragment,
            sport: u16::from_be_bytes([ports[0], ports[1]]),
            dport: be16(&ports, TCP_DPORT),
            seq: 0,
            ack: 0,
            flags: 0,
            data_offset: 0,
        });
    }
    // Read the header against the frame's end before comparing lengths: once the IP length is
    // known to cover it, LLVM would drop the frame check the verifier needs.
    let header: [u8; TCP_MIN_HLEN] = read(ctx, l4).ok_or(Counter::Truncated)?;
    if l4_len < TCP_MIN_HLEN {
        return Err(Counter::Truncated);
    }
    let sport = u16::from_be_bytes([header[0], header[1]]);
    let dport = be16(&header, TCP_DPORT);
    let seq = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let ack = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    let data_offset = header[12] >> 4;
    let flags = header[13];
    Ok(Segment {
        family,
        l3,
        l4,
        l4_len,
        fragment,
        sport,
        dport,
        seq,
        ack,
        flags,
        data_offset,
    })
}
