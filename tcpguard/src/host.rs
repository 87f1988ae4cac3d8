//! The host's own unicast addresses and the protected interface's MAC, read from the kernel
//! (`getifaddrs`) in the daemon's network namespace. The data plane answers a SYN only when
//! both say the segment is the host's own (see `tcpguard_common::is_martian`).

use std::{collections::BTreeSet, net::IpAddr};

use nix::ifaddrs::getifaddrs;
use tcpguard_common::{HostAddress, is_martian};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot list this network namespace's addresses: {0}")]
    List(#[from] nix::Error),
    #[error("interface {0:?} has no Ethernet address; tcpguard protects Ethernet interfaces only")]
    NoMac(String),
}

/// The host as the data plane must know it, from one reading of the kernel's interfaces:
/// `interface`'s MAC and the host's addresses (see [`addresses`]).
pub fn read(interface: &str) -> Result<([u8; 6], BTreeSet<HostAddress>), HostError> {
    let (mac, owned) = scan(interface)?;
    let mac = mac.ok_or_else(|| HostError::NoMac(interface.to_owned()))?;
    Ok((mac, owned))
}

/// The unicast addresses of every interface in this network namespace: Linux delivers a
/// segment to a local socket when its destination is any of them, whichever interface it came
/// in on. Loopback, multicast and the other martian addresses are left out.
pub fn addresses() -> Result<BTreeSet<HostAddress>, HostError> {
    Ok(scan("")?.1)
}

/// `interface`'s MAC (none when it has no Ethernet address) and the host's addresses.
fn scan(interface: &str) -> Result<(Option<[u8; 6]>, BTreeSet<HostAddress>), HostError> {
    let mut mac = None;
    let mut owned = BTreeSet::new();
    for entry in getifaddrs()? {
        let Some(address) = entry.address.as_ref() else {
            continue;
        };
        if let Some(link) = address.as_link_addr() {
            if entry.interface_name == interface {
                mac = link.addr().filter(|mac| *mac != [0; 6]).or(mac);
            }
            continue;
        }
        let Some(ip) = ip_of(address) else {
            continue;
        };
        let host = match ip {
            IpAddr::V4(v4) => HostAddress::v4(v4.octets()),
            IpAddr::V6(v6) => HostAddress::v6(v6.octets()),
        };
        if !is_martian(host.family, &host.address) {
            owned.insert(host);
        }
    }
    Ok((mac, owned))
}

fn ip_of(address: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

/// Text for a log line: `10.0.0.1` or `fd00::1`.
pub fn display(address: &HostAddress) -> String {
    if address.family == tcpguard_common::FLOW_IPV4 {
        let [a, b, c, d, ..] = address.address;
        IpAddr::from([a, b, c, d]).to_string()
    } else {
        IpAddr::from(address.address).to_string()
    }
}
