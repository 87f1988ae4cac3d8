//! Ethernet frames carrying TCP segments, built byte by byte so that tests can also make the
//! malformed ones no ordinary library would write.

use std::net::{Ipv4Addr, Ipv6Addr};

use tcpguard_common::{FLOW_IPV4, FLOW_IPV6, FlowKey, HostAddress};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2);

pub use tcpguard_common::tcp_flags::*;

pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DESTINATION: u8 = 60;

#[derive(Clone, Debug)]
pub enum Ip {
    V4 {
        source: Ipv4Addr,
        destination: Ipv4Addr,
        /// Raw IPv4 options, a multiple of 4 bytes.
        options: Vec<u8>,
    },
    V6 {
        source: Ipv6Addr,
        destination: Ipv6Addr,
        /// Extension headers in order: (type, length in 8-byte units beyond the first 8).
        extensions: Vec<(u8, u8)>,
    },
}

/// A TCP segment in an Ethernet frame.
#[derive(Clone, Debug)]
pub struct TcpFrame {
    pub source_mac: [u8; 6],
    pub destination_mac: [u8; 6],
    /// VLAN tags, outermost first: (TPID, TCI).
    pub vlans: Vec<(u16, u16)>,
    pub ip: Ip,
    /// IPv4: more-fragments flag and offset (in 8-byte units). IPv6 uses a fragment header.
    pub more_fragments: bool,
    pub fragment_offset: u16,
    pub source_port: u16,
    pub destination_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Raw TCP options, padded by `bytes` to a multiple of 4.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
    /// Written instead of the data offset the options imply.
    pub data_offset: Option<u8>,
}

impl TcpFrame {
    /// The segment's connection as tcpguard's data plane keys it, oriented client → server.
    pub fn flow_key(&self) -> FlowKey {
        let (client_addr, server_addr, family) = match &self.ip {
            Ip::V4 {
                source,
                destination,
                ..
            } => (
                HostAddress::v4(source.octets()).address,
                HostAddress::v4(destination.octets()).address,
                FLOW_IPV4,
            ),
            Ip::V6 {
                source,
                destination,
                ..
            } => (source.octets(), destination.octets(), FLOW_IPV6),
        };
        FlowKey {
            client_addr,
            server_addr,
            client_port: self.source_port,
            server_port: self.destination_port,
            family,
            _pad: [0; 3],
        }
    }

    /// A client's SYN to the server's `port` over IPv4, without options.
    pub fn syn_v4(port: u16) -> Self {
        Self {
            source_mac: CLIENT_MAC,
            destination_mac: SERVER_MAC,
            vlans: Vec::new(),
            ip: Ip::V4 {
                source: CLIENT_V4,
                destination: SERVER_V4,
                options: Vec::new(),
            },
            more_fragments: false,
            fragment_offset: 0,
            source_port: 40000,
            destination_port: port,
            seq: 0x1234_5678,
            ack: 0,
            flags: SYN,
            window: 64240,
            options: Vec::new(),
            payload: Vec::new(),
            data_offset: None,
        }
    }

    /// A client's SYN to the server's `port` over IPv6, without options.
    pub fn syn_v6(port: u16) -> Self {
        Self {
            ip: Ip::V6 {
                source: CLIENT_V6,
                destination: SERVER_V6,
                extensions: Vec::new(),
            },
            ..Self::syn_v4(port)
        }
    }

    pub fn with_flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }

    pub fn with_options(mut self, options: Vec<u8>) -> Self {
        self.options = options;
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let tcp = self.tcp_bytes();
        let mut frame = Vec::new();
        frame.extend_from_slice(&self.destination_mac);
        frame.extend_from_slice(&self.source_mac);
        for (tpid, tci) in &self.vlans {
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&tci.to_be_bytes());
        }
        match &self.ip {
            Ip::V4 {
                source,
                destination,
                options,
            } => {
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                let header_len = 20 + options.len();
                let mut header = vec![0u8; 20];
                header[0] = 0x40 | (header_len / 4) as u8;
                header[2..4].copy_from_slice(&((header_len + tcp.len()) as u16).to_be_bytes());
                header[4..6].copy_from_slice(&0x4242u16.to_be_bytes());
                let fragment = if self.more_fragments || self.fragment_offset != 0 {
                    u16::from(self.more_fragments) << 13 | self.fragment_offset
                } else {
                    0x4000 // DF
                };
                header[6..8].copy_from_slice(&fragment.to_be_bytes());
                header[8] = 64;
                header[9] = 6;
                header[12..16].copy_from_slice(&source.octets());
                header[16..20].copy_from_slice(&destination.octets());
                header.extend_from_slice(options);
                let checksum = internet_checksum(0, &header);
                header[10..12].copy_from_slice(&checksum.to_be_bytes());
                frame.extend_from_slice(&header);
                let mut tcp = tcp;
                let pseudo = pseudo_sum(&source.octets(), &destination.octets(), tcp.len());
                let checksum = internet_checksum(pseudo, &tcp);
                tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
                frame.extend_from_slice(&tcp);
            }
            Ip::V6 {
                source,
                destination,
                extensions,
            } => {
                frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut chain = Vec::new();
                for (i, &(kind, units)) in extensions.iter().enumerate() {
                    let next = extensions.get(i + 1).map_or(6, |&(next, _)| next);
                    let mut header = vec![0u8; 8 * (usize::from(units) + 1)];
                    header[0] = next;
                    if kind == IPV6_FRAGMENT {
                        let offset_and_more =
                            self.fragment_offset << 3 | u16::from(self.more_fragments);
                        header.truncate(8);
                        header[2..4].copy_from_slice(&offset_and_more.to_be_bytes());
                        header[4..8].copy_from_slice(&0x4242u32.to_be_bytes());
                    } else {
                        header[1] = units;
                    }
                    chain.extend_from_slice(&header);
                }
                let mut header = vec![0u8; 40];
                header[0] = 0x60;
                header[4..6].copy_from_slice(&((chain.len() + tcp.len()) as u16).to_be_bytes());
                header[6] = extensions.first().map_or(6, |&(kind, _)| kind);
                header[7] = 64;
                header[8..24].copy_from_slice(&source.octets());
                header[24..40].copy_from_slice(&destination.octets());
                frame.extend_from_slice(&header);
                frame.extend_from_slice(&chain);
                let mut tcp = tcp;
                let pseudo = pseudo_sum(&source.octets(), &destination.octets(), tcp.len());
                let checksum = internet_checksum(pseudo, &tcp);
                tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
                frame.extend_from_slice(&tcp);
            }
        }
        frame
    }

    fn tcp_bytes(&self) -> Vec<u8> {
        let mut options = self.options.clone();
        while !options.len().is_multiple_of(4) {
            options.push(0);
        }
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&self.source_port.to_be_bytes());
        tcp[2..4].copy_from_slice(&self.destination_port.to_be_bytes());
        tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&self.ack.to_be_bytes());
        let data_offset = self.data_offset.unwrap_or((5 + options.len() / 4) as u8);
        tcp[12] = data_offset << 4;
        tcp[13] = self.flags;
        tcp[14..16].copy_from_slice(&self.window.to_be_bytes());
        tcp.extend_from_slice(&options);
        tcp.extend_from_slice(&self.payload);
        tcp
    }
}

/// The options a Linux client puts in its SYN: MSS, SACK-permitted, timestamps, window scale.
pub fn linux_syn_options(mss: u16, tsval: u32, window_scale: u8) -> Vec<u8> {
    let mut options = vec![2, 4];
    options.extend_from_slice(&mss.to_be_bytes());
    options.extend_from_slice(&[4, 2, 8, 10]);
    options.extend_from_slice(&tsval.to_be_bytes());
    options.extend_from_slice(&[0, 0, 0, 0, 1, 3, 3, window_scale]);
    options
}

/// The options macOS puts in its SYN, in its order: MSS, NOP, WS, NOP, NOP, TS, SACK-permitted,
/// EOL.
pub fn macos_syn_options(mss: u16, tsval: u32, window_scale: u8) -> Vec<u8> {
    let mut options = vec![2, 4];
    options.extend_from_slice(&mss.to_be_bytes());
    options.extend_from_slice(&[1, 3, 3, window_scale, 1, 1, 8, 10]);
    options.extend_from_slice(&tsval.to_be_bytes());
    options.extend_from_slice(&[0, 0, 0, 0, 4, 2, 0, 0]);
    options
}

/// The options Windows puts in its SYN (no timestamps): MSS, NOP, WS, NOP, NOP, SACK-permitted.
pub fn windows_syn_options(mss: u16, window_scale: u8) -> Vec<u8> {
    let mut options = vec![2, 4];
    options.extend_from_slice(&mss.to_be_bytes());
    options.extend_from_slice(&[1, 3, 3, window_scale, 1, 1, 4, 2]);
    options
}

/// Recomputes the checksum of the IPv4 header at `l3` after a test changed a field of it.
pub fn refresh_ipv4_checksum(frame: &mut [u8], l3: usize) {
    let header_len = usize::from(frame[l3] & 0x0f) * 4;
    frame[l3 + 10..l3 + 12].fill(0);
    let checksum = internet_checksum(0, &frame[l3..l3 + header_len]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&checksum.to_be_bytes());
}

fn pseudo_sum(source: &[u8], destination: &[u8], tcp_len: usize) -> u32 {
    let mut sum = 6 + tcp_len as u32;
    for pair in source.chunks(2).chain(destination.chunks(2)) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    sum
}

fn internet_checksum(mut sum: u32, bytes: &[u8]) -> u16 {
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
