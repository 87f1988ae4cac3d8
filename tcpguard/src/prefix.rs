//! IPv4 and IPv6 prefixes as the allow and deny lists take them: `192.0.2.0/24`,
//! `2001:db8::/32`, or a bare address for a single host.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use serde::{Deserialize, Deserializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prefix {
    pub address: IpAddr,
    pub length: u8,
}

impl Prefix {
    /// Whether `address` lies inside the prefix.
    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.address, address) {
            (IpAddr::V4(net), IpAddr::V4(addr)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.length))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(addr) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(addr)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.length))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(addr) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address_text, length_text) = match text.split_once('/') {
            Some((address, length)) => (address, Some(length)),
            None => (text, None),
        };
        let address: IpAddr = address_text.parse().map_err(|_| {
            format!("{text:?} is not an IPv4 or IPv6 prefix such as 192.0.2.0/24 or 2001:db8::/32")
        })?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let length = match length_text {
            None => max,
            Some(length) => length
                .parse::<u8>()
                .ok()
                .filter(|&length| length <= max)
                .ok_or_else(|| {
                    format!("prefix length in {text:?} must be a number from 0 to {max}")
                })?,
        };
        let prefix = Self { address, length };
        let network = prefix.network();
        if network != address {
            return Err(format!(
                "{text:?} has host bits set; the prefix is {network}/{length}"
            ));
        }
        Ok(prefix)
    }
}

impl Prefix {
    fn network(&self) -> IpAddr {
        match self.address {
            IpAddr::V4(addr) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.length))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(addr) & mask).into())
            }
            IpAddr::V6(addr) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.length))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(addr) & mask).into())
            }
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.length)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A list of prefixes, for asking of many addresses whether any prefix holds them: each
/// address is masked to each prefix length the list has and looked up, rather than compared
/// with every prefix.
#[derive(Clone, Debug, Default)]
pub struct PrefixSet {
    /// By family (4 or 6) and prefix length, the networks, as the address's bits.
    networks: BTreeMap<(u8, u8), HashSet<u128>>,
}

impl PrefixSet {
    pub fn new(prefixes: &[Prefix]) -> Self {
        let mut networks: BTreeMap<(u8, u8), HashSet<u128>> = BTreeMap::new();
        for prefix in prefixes {
            let (family, bits) = family_bits(prefix.address);
            networks
                .entry((family, prefix.length))
                .or_default()
                .insert(bits & mask(family, prefix.length));
        }
        Self { networks }
    }

    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// Whether a prefix of the list holds `address`.
    pub fn contains(&self, address: IpAddr) -> bool {
        let (family, bits) = family_bits(address);
        self.networks
            .range((family, 0)..=(family, u8::MAX))
            .any(|(&(_, length), networks)| networks.contains(&(bits & mask(family, length))))
    }
}

/// An address as its family and its bits (an IPv4 address in the low 32).
fn family_bits(address: IpAddr) -> (u8, u128) {
    match address {
        IpAddr::V4(v4) => (4, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (6, u128::from(v6)),
    }
}

/// The mask of a prefix `length` bits long, in the bits [`family_bits`] gives.
fn mask(family: u8, length: u8) -> u128 {
    let width = if family == 4 { 32 } else { 128 };
    let all = u128::MAX >> (128 - width);
    all & !(all.checked_shr(u32::from(length)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_networks_and_hosts() {
        let net: Prefix = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains("10.200.1.2".parse().unwrap()));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let host: Prefix = "2001:db8::1".parse().unwrap();
        assert_eq!(host.length, 128);
        let all: Prefix = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
    }

    proptest::proptest! {
        /// A set holds an address exactly when one of its prefixes does.
        #[test]
        fn a_set_holds_what_one_of_its_prefixes_holds(
            networks in proptest::collection::vec((proptest::bool::ANY, proptest::num::u128::ANY, 0u8..=128), 0..8),
            probes in proptest::collection::vec((proptest::bool::ANY, proptest::num::u128::ANY), 1..32),
        ) {
            let address = |v4: bool, bits: u128| -> IpAddr {
                if v4 {
                    IpAddr::V4((bits as u32).into())
                } else {
                    IpAddr::V6(bits.into())
                }
            };
            let prefixes: Vec<Prefix> = networks
                .iter()
                .map(|&(v4, bits, length)| {
                    let length = if v4 { length % 33 } else { length };
                    let prefix = Prefix { address: address(v4, bits), length };
                    Prefix { address: prefix.network(), length }
                })
                .collect();
            let set = PrefixSet::new(&prefixes);
            // Probes both at random and inside each prefix (the prefix's own network).
            let inside = prefixes.iter().map(|prefix| prefix.address);
            for probe in probes.iter().map(|&(v4, bits)| address(v4, bits)).chain(inside) {
                let expected = prefixes.iter().any(|prefix| prefix.contains(probe));
                proptest::prop_assert_eq!(set.contains(probe), expected, "{}", probe);
            }
        }
    }

    #[test]
    fn refuses_with_a_sentence_naming_the_value() {
        for (text, expected) in [
            (
                "10.0.0.1/8",
                "\"10.0.0.1/8\" has host bits set; the prefix is 10.0.0.0/8",
            ),
            (
                "10.0.0.0/33",
                "prefix length in \"10.0.0.0/33\" must be a number from 0 to 32",
            ),
            (
                "example.com",
                "\"example.com\" is not an IPv4 or IPv6 prefix",
            ),
        ] {
            let err = text.parse::<Prefix>().unwrap_err();
            assert!(err.starts_with(expected), "{err}");
        }
    }
}
