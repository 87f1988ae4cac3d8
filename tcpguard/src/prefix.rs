//! IPv4 and IPv6 prefixes as the allow and deny lists take them: `192.0.2.0/24`,
//! `2001:db8::/32`, or a bare address for a single host.

use std::{fmt, net::IpAddr, str::FromStr};

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
