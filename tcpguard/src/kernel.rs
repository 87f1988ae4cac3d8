//! The oldest kernel tcpguard runs on. Features that need a newer one are checked where they
//! are used, by asking the kernel: TCX (6.6, [`crate::tc::probe`]) and the kfunc own cookies
//! need (6.9, [`crate::cookies::choose`]). Both fall back (to TC through netlink, to the
//! kernel's cookies) on the older kernels tcpguard supports, down to Debian 12's 6.1.

use aya::util::KernelVersion;

/// The oldest kernel tcpguard supports: Debian 12's, which the VM test boots. Its XDP program
/// needs Linux 5.18 for `bpf_xdp_load_bytes`, `bpf_xdp_store_bytes` and
/// `bpf_xdp_get_buff_len`, 5.9 for XDP links, 5.8 for the ring buffer and 5.3 for bounded
/// loops and `bpf_tcp_gen_syncookie`, but no verifier older than 6.1's has been tried, and
/// each one that was (6.1, 6.12) refused something the next one took.
pub const MINIMUM: KernelVersion = KernelVersion::new(6, 1, 0);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "tcpguard needs Linux {MINIMUM} or later (the oldest kernel it is tested on); this kernel is {running} ({release})"
    )]
    TooOld {
        running: KernelVersion,
        release: String,
    },
    #[error("cannot tell which Linux release this is: {0}")]
    Unknown(String),
}

/// Refuses a kernel older than [`MINIMUM`].
pub fn check() -> Result<(), KernelError> {
    let running = KernelVersion::current().map_err(|err| KernelError::Unknown(err.to_string()))?;
    check_version(running, crate::cookies::kernel_release())
}

fn check_version(running: KernelVersion, release: String) -> Result<(), KernelError> {
    if running < MINIMUM {
        return Err(KernelError::TooOld { running, release });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_before_6_1_are_refused_with_both_versions_named() {
        for (major, minor, patch) in [(5, 14, 0), (5, 15, 167), (6, 0, 19)] {
            let running = KernelVersion::new(major, minor, patch);
            let error = check_version(running, format!("{major}.{minor}.{patch}-test"))
                .expect_err("older than 6.1")
                .to_string();
            assert_eq!(
                error,
                format!(
                    "tcpguard needs Linux 6.1.0 or later (the oldest kernel it is tested on); this kernel is {major}.{minor}.{patch} ({major}.{minor}.{patch}-test)"
                )
            );
        }
        for (major, minor, patch) in [(6, 1, 0), (6, 1, 158), (6, 12, 57), (6, 18, 0), (7, 0, 0)] {
            assert!(check_version(KernelVersion::new(major, minor, patch), String::new()).is_ok());
        }
    }

    #[test]
    fn the_running_kernel_is_supported() {
        check().expect("the test machines run 6.1 or later");
    }
}
