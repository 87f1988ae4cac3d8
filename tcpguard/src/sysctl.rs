//! The sysctls SYN cookies from XDP depend on, read and set in the daemon's network namespace.

use std::{fs, io, path::PathBuf};

use tcpguard_common::{NO_WINDOW_SCALE, SynCookieConfig};

/// `bpf_tcp_gen_syncookie` answers -ENOENT unless this is 2 (cookies always), and with 1 the
/// kernel would only accept cookie ACKs while its SYN queue is full.
pub const TCP_SYNCOOKIES: Sysctl = Sysctl::new("net.ipv4.tcp_syncookies", 2);
/// With 1 the kernel subtracts a secret per-connection offset from the echoed timestamp, which
/// destroys the options tcpguard encodes in it; 2 keeps timestamps without that offset.
pub const TCP_TIMESTAMPS: Sysctl = Sysctl::new("net.ipv4.tcp_timestamps", 2);

/// A sysctl tcpguard needs at a particular value.
#[derive(Clone, Copy, Debug)]
pub struct Sysctl {
    pub name: &'static str,
    pub required: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot read {name} ({path}): {source}")]
    Read {
        name: String,
        path: String,
        source: io::Error,
    },
    #[error("cannot set {name} to {value} ({path}): {source}")]
    Write {
        name: String,
        value: u64,
        path: String,
        source: io::Error,
    },
    #[error("{name} is {found:?}, which is not a list of whole numbers")]
    Parse { name: String, found: String },
    #[error(
        "{name} is {found} but tcpguard needs {required}; run `sysctl -w {name}={required}` \
         or start tcpguard without --keep-sysctls so that it sets it"
    )]
    Refused {
        name: &'static str,
        found: u64,
        required: u64,
    },
}

/// What [`ensure`] did to one sysctl.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    AlreadySet,
    Changed { from: u64 },
}

impl Sysctl {
    pub const fn new(name: &'static str, required: u64) -> Self {
        Self { name, required }
    }

    /// Makes the sysctl hold its required value, or, when `may_change` is false, says that it
    /// does not.
    pub fn ensure(&self, may_change: bool) -> Result<Outcome, SysctlError> {
        let found = read_one(self.name)?;
        if found == self.required {
            return Ok(Outcome::AlreadySet);
        }
        if !may_change {
            return Err(SysctlError::Refused {
                name: self.name,
                found,
                required: self.required,
            });
        }
        write(self.name, self.required)?;
        Ok(Outcome::Changed { from: found })
    }
}

fn path(name: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(name.replace('.', "/"))
}

/// All whole numbers a sysctl holds (`tcp_rmem` holds three).
pub fn read(name: &str) -> Result<Vec<u64>, SysctlError> {
    let path = path(name);
    let text = fs::read_to_string(&path).map_err(|source| SysctlError::Read {
        name: name.to_owned(),
        path: path.display().to_string(),
        source,
    })?;
    text.split_whitespace()
        .map(|word| word.parse())
        .collect::<Result<Vec<u64>, _>>()
        .ok()
        .filter(|values| !values.is_empty())
        .ok_or_else(|| SysctlError::Parse {
            name: name.to_owned(),
            found: text.trim().to_owned(),
        })
}

fn read_one(name: &str) -> Result<u64, SysctlError> {
    Ok(read(name)?[0])
}

pub fn write(name: &str, value: u64) -> Result<(), SysctlError> {
    let path = path(name);
    fs::write(&path, value.to_string()).map_err(|source| SysctlError::Write {
        name: name.to_owned(),
        value,
        path: path.display().to_string(),
        source,
    })
}

/// How SYN-ACKs must look for sockets built from them to match, from this namespace's sysctls.
pub fn syn_cookie_config() -> Result<SynCookieConfig, SysctlError> {
    let window_scale = if read_one("net.ipv4.tcp_window_scaling")? == 0 {
        NO_WINDOW_SCALE
    } else {
        window_scale(
            read("net.ipv4.tcp_rmem")?[2],
            read_one("net.core.rmem_max")?,
        )
    };
    Ok(SynCookieConfig {
        window_scale,
        sack: u8::from(read_one("net.ipv4.tcp_sack")? != 0),
        ttl: read_one("net.ipv4.ip_default_ttl")?.clamp(1, 255) as u8,
        _pad: 0,
        ecn: u8::from(read_one("net.ipv4.tcp_ecn")? != 0),
        timestamps: u8::from(read_one("net.ipv4.tcp_timestamps")? != 0),
        mss: DEFAULT_MSS,
    })
}

/// The MSS an IPv4 SYN-ACK advertises on a 1500-byte Ethernet MTU.
pub const DEFAULT_MSS: u16 = 1460;

/// The MSS the kernel advertises on `interface` for IPv4: its MTU less the IPv4 and TCP
/// headers (`tcp_mss_to_mtu`'s inverse), or [`DEFAULT_MSS`] when the MTU cannot be read.
pub fn interface_mss(interface: &str) -> u16 {
    fs::read_to_string(format!("/sys/class/net/{interface}/mtu"))
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .map_or(DEFAULT_MSS, |mtu| {
            mtu.saturating_sub(40).clamp(536, 65_495) as u16
        })
}

/// The receive window scale the kernel gives a socket whose listener sets no window clamp:
/// `tcp_select_initial_window` scales for the largest buffer it may grow to,
/// max(tcp_rmem[2], rmem_max), as ilog2(space) - 15, clamped to 0..=14.
pub fn window_scale(tcp_rmem_max: u64, rmem_max: u64) -> u8 {
    // The kernel caps the space at the largest scaled window, 65535 << 14.
    let space = tcp_rmem_max.max(rmem_max).clamp(1, 65535 << 14);
    (space.ilog2().saturating_sub(15)).min(14) as u8
}

#[cfg(test)]
mod tests {
    use super::window_scale;

    #[test]
    fn window_scale_follows_the_kernel_formula() {
        // Debian defaults: tcp_rmem[2] = 6 MiB, rmem_max = 208 KiB.
        assert_eq!(window_scale(6_291_456, 212_992), 7);
        assert_eq!(window_scale(32 << 20, 212_992), 10);
        assert_eq!(window_scale(65_535, 65_535), 0);
        assert_eq!(window_scale(u64::MAX, 0), 14);
    }
}
