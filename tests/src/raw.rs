//! TCP segments a test writes and reads itself, through raw sockets: for a handshake whose
//! halves happen on different hosts, or an ACK whose SYN the server never saw. The kernel adds
//! and strips the IPv4 header; these build and parse the TCP segment with its checksum.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use tcpguard_common::tcp_flags::ACK;

/// A TCP segment between two IPv4 endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// Options, a multiple of 4 bytes.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Segment {
    /// A bare ACK (no options, no data).
    pub fn ack(source: SocketAddrV4, destination: SocketAddrV4, seq: u32, ack: u32) -> Self {
        Self {
            source,
            destination,
            seq,
            ack,
            flags: ACK,
            options: Vec::new(),
            payload: Vec::new(),
        }
    }

    /// The segment's bytes, checksum included.
    pub fn bytes(&self) -> Vec<u8> {
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&self.source.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&self.destination.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&self.ack.to_be_bytes());
        tcp[12] = ((5 + self.options.len() / 4) as u8) << 4;
        tcp[13] = self.flags;
        tcp[14..16].copy_from_slice(&502u16.to_be_bytes());
        tcp.extend_from_slice(&self.options);
        tcp.extend_from_slice(&self.payload);
        let mut sum: u32 = 0;
        let mut add = |bytes: &[u8]| {
            for pair in bytes.chunks(2) {
                sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            }
        };
        add(&self.source.ip().octets());
        add(&self.destination.ip().octets());
        add(&[0, libc::IPPROTO_TCP as u8]);
        add(&(tcp.len() as u16).to_be_bytes());
        add(&tcp);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        tcp
    }

    /// Parses an IPv4 packet as a raw socket returns it.
    fn parse(packet: &[u8]) -> Option<Self> {
        let ip_len = usize::from(packet.first()? & 0x0f) * 4;
        if packet.get(9) != Some(&(libc::IPPROTO_TCP as u8)) {
            return None;
        }
        let address = |at: usize| {
            Some(Ipv4Addr::from(
                <[u8; 4]>::try_from(packet.get(at..at + 4)?).ok()?,
            ))
        };
        let (source, destination) = (address(12)?, address(16)?);
        let tcp = packet.get(ip_len..)?;
        let word = |at: usize| Some(u32::from_be_bytes(tcp.get(at..at + 4)?.try_into().ok()?));
        let port = |at: usize| Some(u16::from_be_bytes(tcp.get(at..at + 2)?.try_into().ok()?));
        let header_len = usize::from(tcp.get(12)? >> 4) * 4;
        Some(Self {
            source: SocketAddrV4::new(source, port(0)?),
            destination: SocketAddrV4::new(destination, port(2)?),
            seq: word(4)?,
            ack: word(8)?,
            flags: *tcp.get(13)?,
            options: tcp.get(20..header_len)?.to_vec(),
            payload: tcp.get(header_len..)?.to_vec(),
        })
    }
}

/// A raw TCP socket in the calling thread's network namespace.
pub struct RawTcp(OwnedFd);

impl RawTcp {
    pub fn open() -> Self {
        // SAFETY: a plain socket call; the descriptor is owned from here on.
        // Close-on-exec, as std's sockets are, so that processes other tests spawn do not
        // inherit it.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_TCP,
            )
        };
        assert!(fd >= 0, "raw socket: {}", io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Self(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn send(&self, segment: &Segment) {
        let bytes = segment.bytes();
        let address = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(segment.destination.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: bytes and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&raw const address).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(
            sent,
            bytes.len() as isize,
            "sendto: {}",
            io::Error::last_os_error()
        );
    }

    /// The first segment `wanted` accepts within `timeout`.
    pub fn receive(&self, timeout: Duration, wanted: impl Fn(&Segment) -> bool) -> Option<Segment> {
        let deadline = Instant::now() + timeout;
        let mut buffer = [0u8; 65536];
        while Instant::now() < deadline {
            let mut poll = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut poll, 1, 50) } <= 0 {
                continue;
            }
            // SAFETY: buffer is valid for its length.
            let got = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if got <= 0 {
                continue;
            }
            if let Some(segment) = Segment::parse(&buffer[..got as usize]).filter(&wanted) {
                return Some(segment);
            }
        }
        None
    }
}
