//! Which frames belong to the host itself: those the kernel would deliver to one of its own
//! sockets. tcpguard judges and answers nothing else; a frame for another machine (a router's
//! or a container host's forwarded traffic), to another MAC, or from or to a martian address
//! goes to the kernel untouched, as if tcpguard were not there.

use crate::{FLOW_IPV4, FLOW_IPV6};

/// Key of [`crate::maps::HOST_ADDRESSES`]: a unicast address the host owns, in the interface's
/// network namespace. IPv4 sits in the first four bytes, the rest zero, as in
/// [`crate::FlowKey`].
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostAddress {
    pub address: [u8; 16],
    /// [`FLOW_IPV4`] or [`FLOW_IPV6`].
    pub family: u8,
    pub _pad: [u8; 7],
}

impl HostAddress {
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut address = [0; 16];
        address[0] = octets[0];
        address[1] = octets[1];
        address[2] = octets[2];
        address[3] = octets[3];
        Self {
            address,
            family: FLOW_IPV4,
            _pad: [0; 7],
        }
    }

    pub const fn v6(address: [u8; 16]) -> Self {
        Self {
            address,
            family: FLOW_IPV6,
            _pad: [0; 7],
        }
    }
}

/// A 256-bit summary of the host's addresses, the single entry of
/// [`crate::maps::HOST_ADDRESS_FILTER`]: an address whose bit is clear is not one of them, so
/// the data plane skips the hash lookup for it. A SYN flood's random sources almost all land on
/// a clear bit; the host's own few addresses set a few bits. The bit is the address's last
/// byte (IPv4's last octet) mixed with its fourth and its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostFilter {
    pub bits: [u64; 4],
}

impl HostFilter {
    /// The filter that holds every address in `addresses`.
    pub fn of<'a>(addresses: impl IntoIterator<Item = &'a HostAddress>) -> Self {
        let mut filter = Self::default();
        for host in addresses {
            let bit = Self::bit(host.family, &host.address);
            filter.bits[usize::from(bit >> 6)] |= 1 << (bit & 63);
        }
        filter
    }

    /// False when `address` is certainly not one the filter was made of.
    #[inline(always)]
    pub fn may_hold(&self, family: u8, address: &[u8; 16]) -> bool {
        let bit = Self::bit(family, address);
        self.bits[usize::from(bit >> 6) & 3] & 1 << (bit & 63) != 0
    }

    #[inline(always)]
    fn bit(family: u8, address: &[u8; 16]) -> u8 {
        address[15] ^ address[3] ^ family
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)], integers only, padding spelled out.
    unsafe impl aya::Pod for super::HostAddress {}
    unsafe impl aya::Pod for super::HostFilter {}
}

/// Whether a frame sent to `destination` reaches the host's own stack, the interface's own
/// MAC being `interface_mac`: the interface's unicast MAC and nothing else (not broadcast, not
/// multicast, not another host's MAC seen in promiscuous mode). The kernel delivers to local
/// sockets only frames sent to it (`PACKET_HOST`).
#[inline(always)]
pub fn is_for_interface(destination: [u8; 6], interface_mac: &[u8; 6]) -> bool {
    destination == *interface_mac && *interface_mac != [0; 6] && interface_mac[0] & 1 == 0
}

/// An address that can be neither end of a TCP connection on the wire, the way Linux judges
/// it (`ip_route_input_slow`, `ipv6_rcv`): IPv4 0.0.0.0 (the rest of 0.0.0.0/8 is unicast
/// since Linux 5.3, and the kernel answers it), loopback 127.0.0.0/8, multicast 224.0.0.0/4
/// and the limited broadcast 255.255.255.255; IPv6 the unspecified address,
/// loopback `::1`, multicast `ff00::/8` and IPv4-mapped `::ffff:0:0/96`. Any other family is
/// martian too.
#[inline(always)]
pub fn is_martian(family: u8, address: &[u8; 16]) -> bool {
    match family {
        FLOW_IPV4 => {
            let first = address[0];
            (first == 0 && address[1] == 0 && address[2] == 0 && address[3] == 0)
                || first == 127
                || first & 0xf0 == 0xe0
                || (first == 255 && address[1] == 255 && address[2] == 255 && address[3] == 255)
        }
        FLOW_IPV6 => {
            let high = u64::from_be_bytes([
                address[0], address[1], address[2], address[3], address[4], address[5], address[6],
                address[7],
            ]);
            let low = u64::from_be_bytes([
                address[8],
                address[9],
                address[10],
                address[11],
                address[12],
                address[13],
                address[14],
                address[15],
            ]);
            (high == 0 && (low == 0 || low == 1 || low >> 32 == 0xffff)) || address[0] == 0xff
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn the_host_filter_holds_every_address_it_was_made_of_and_few_others() {
        let hosts = [
            HostAddress::v4([10, 0, 0, 1]),
            HostAddress::v4([192, 168, 7, 200]),
            HostAddress::v6("fd00::1".parse::<Ipv6Addr>().unwrap().octets()),
            HostAddress::v6("fe80::8c2:aff:fe00:2".parse::<Ipv6Addr>().unwrap().octets()),
        ];
        let filter = HostFilter::of(&hosts);
        for host in &hosts {
            assert!(filter.may_hold(host.family, &host.address), "{host:?}");
        }
        assert!(!HostFilter::default().may_hold(FLOW_IPV4, &hosts[0].address));
        // A flood's sources: of 65,536 IPv4 addresses, only those sharing a bit with the four
        // hosts (at most 4 of 256 last octets) need the lookup.
        let maybe = (0..=u16::MAX)
            .map(|n| HostAddress::v4([10, 128, (n >> 8) as u8, n as u8]))
            .filter(|source| filter.may_hold(source.family, &source.address))
            .count();
        assert!(maybe <= 4 * 256, "{maybe} of 65536 sources need a lookup");
    }

    fn martian(address: &str) -> bool {
        match address.parse::<IpAddr>().unwrap() {
            IpAddr::V4(v4) => is_martian(FLOW_IPV4, &HostAddress::v4(v4.octets()).address),
            IpAddr::V6(v6) => is_martian(FLOW_IPV6, &v6.octets()),
        }
    }

    #[test]
    fn martian_addresses_are_the_ones_linux_refuses() {
        for address in [
            "0.0.0.0",
            "127.0.0.1",
            "127.255.0.9",
            "224.0.0.1",
            "239.255.255.255",
            "255.255.255.255",
            "::",
            "::1",
            "ff02::1",
            "ff05::2",
            "::ffff:10.0.0.1",
        ] {
            assert!(martian(address), "{address} is martian");
        }
        for address in [
            "10.0.0.1",
            "0.1.2.3",
            "192.168.1.255",
            "223.255.255.255",
            "240.0.0.1",
            "255.255.255.254",
            "fe80::1",
            "fd00::1",
            "2001:db8::1",
            "::2",
            "::fffe:1.2.3.4",
        ] {
            assert!(!martian(address), "{address} is not martian");
        }
        assert!(is_martian(0, &[0; 16]), "an unknown family");
        // Cross-check with the standard library's classification where it has one.
        for v4 in [
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
        ] {
            assert!(is_martian(FLOW_IPV4, &HostAddress::v4(v4.octets()).address));
        }
        for v6 in [Ipv6Addr::LOCALHOST, Ipv6Addr::UNSPECIFIED] {
            assert!(is_martian(FLOW_IPV6, &v6.octets()));
        }
    }

    #[test]
    fn only_the_interfaces_own_unicast_mac_is_for_it() {
        let interface = [0x02, 0, 0, 0, 0, 2];
        assert!(is_for_interface([0x02, 0, 0, 0, 0, 2], &interface));
        assert!(!is_for_interface([0x02, 0, 0, 0, 0, 3], &interface));
        assert!(!is_for_interface([0xff; 6], &interface));
        assert!(!is_for_interface([0x33, 0x33, 0, 0, 0, 1], &interface));
        let unset = [0; 6];
        assert!(
            !is_for_interface([0; 6], &unset),
            "an unset MAC matches nothing"
        );
    }
}
