//! Which SYN cookies tcpguard answers with, and the keys of its own: chosen at start from what
//! the kernel offers, drawn at random or derived from a file the hosts behind one address
//! share, and rotated. No key ever reaches a log line, a metric or an error message.

use std::{
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use tcpguard_common::cookie::{COOKIE_LIFETIME_S, CookieSecrets, siphash24};

use crate::{
    config::{CookieMode, Cookies},
    reqsk::{KFUNC, kfunc_available},
};

/// The release that brought the kernel function own cookies need.
pub const KFUNC_SINCE: &str = "6.9";
/// The most a secret file may hold; a key is 32 hex digits.
const SECRET_FILE_LIMIT: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CookieError {
    #[error(
        "cookie_mode = \"own\" needs the kernel function {KFUNC}, which Linux {KFUNC_SINCE} and later have; this kernel ({release}) lacks it: use cookie_mode = \"auto\" or \"kernel\""
    )]
    NoKfunc { release: String },
    #[error(
        "net.ipv4.tcp_syncookies is 0, and own cookies need it at 1 (the kernel's default) or 2: run `sysctl -w net.ipv4.tcp_syncookies=1`"
    )]
    SyncookiesOff,
    #[error("cannot read cookie_secret_file {path}: {source}")]
    ReadSecret { path: PathBuf, source: io::Error },
    #[error(
        "cookie_secret_file {path} does not hold a key: it must hold 32 hex digits (128 bits), such as `openssl rand -hex 16` prints"
    )]
    BadSecret { path: PathBuf },
    #[error("cannot draw a random cookie key from /dev/urandom: {0}")]
    Random(io::Error),
    #[error(
        "cookies = \"under-attack\" needs tcpguard's own cookies, and this daemon runs the kernel's ({reason}): those need net.ipv4.tcp_syncookies = 2, with which the kernel answers every SYN with a cookie itself; use cookies = \"always\", or own cookies (Linux {KFUNC_SINCE}+)"
    )]
    UnderAttackNeedsOwn { reason: String },
}

/// When SYNs get cookies on the path `choice` names, and why.
pub fn when(
    configured: Option<Cookies>,
    choice: &Choice,
) -> Result<(Cookies, String), CookieError> {
    match (configured, choice.own) {
        (Some(Cookies::UnderAttack), false) => Err(CookieError::UnderAttackNeedsOwn {
            reason: choice.reason.clone(),
        }),
        (Some(cookies), _) => Ok((cookies, format!("cookies = \"{cookies}\""))),
        (None, true) => Ok((
            Cookies::UnderAttack,
            "cookies = \"auto\" and own cookies run".to_owned(),
        )),
        (None, false) => Ok((
            Cookies::Always,
            "cookies = \"auto\" and the kernel's cookies run, whose tcp_syncookies = 2 makes the kernel answer every SYN with a cookie itself".to_owned(),
        )),
    }
}

/// The cookie path that runs, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub own: bool,
    pub reason: String,
}

/// Picks the cookie path for `mode` on this kernel.
pub fn choose(mode: CookieMode) -> Result<Choice, CookieError> {
    let has_kfunc = kfunc_available();
    let release = kernel_release();
    match (mode, has_kfunc) {
        (CookieMode::Own, false) => Err(CookieError::NoKfunc { release }),
        (CookieMode::Own, true) => Ok(Choice {
            own: true,
            reason: "cookie_mode = \"own\"".to_owned(),
        }),
        (CookieMode::Kernel, _) => Ok(Choice {
            own: false,
            reason: "cookie_mode = \"kernel\"".to_owned(),
        }),
        (CookieMode::Auto, true) => Ok(Choice {
            own: true,
            reason: format!("cookie_mode = \"auto\" and kernel {release} has {KFUNC}"),
        }),
        (CookieMode::Auto, false) => Ok(Choice {
            own: false,
            reason: format!(
                "cookie_mode = \"auto\" and kernel {release} lacks {KFUNC} (Linux {KFUNC_SINCE}+)"
            ),
        }),
    }
}

pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "of unknown release".to_owned())
}

/// TAI seconds, the clock the data plane's cookie counter and key times use.
pub fn tai_now_s() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_TAI, &mut now) };
    now.tv_sec as u64
}

/// Where the keys come from.
enum Source {
    /// Random keys of this host's own, a fresh one at every rotation.
    Random,
    /// Keys derived from a shared secret and the rotation period number, so that every host
    /// holding the same file computes the same key at the same (TAI) time.
    Shared { master: [u64; 2] },
}

/// The keys the data plane checks cookies with, and when they change.
pub struct KeyRing {
    source: Source,
    rotation: Duration,
    /// TAI second of the next random rotation.
    next_rotation_s: u64,
}

impl KeyRing {
    /// Keys from `secret_file`, or random ones.
    pub fn new(secret_file: Option<&Path>, rotation: Duration) -> Result<Self, CookieError> {
        let source = match secret_file {
            Some(path) => Source::Shared {
                master: read_secret(path)?,
            },
            None => Source::Random,
        };
        Ok(Self {
            source,
            rotation,
            next_rotation_s: tai_now_s() + rotation.as_secs(),
        })
    }

    /// Whether the keys are shared with other hosts.
    pub fn shared(&self) -> bool {
        matches!(self.source, Source::Shared { .. })
    }

    /// The keys the data plane should hold now, given what it holds (`held`, from a pinned map
    /// an earlier daemon wrote, or all zero): `None` when `held` is right as it is.
    pub fn update(
        &mut self,
        held: &CookieSecrets,
        now_s: u64,
    ) -> Result<Option<CookieSecrets>, CookieError> {
        let period = self.rotation.as_secs();
        match self.source {
            Source::Shared { master } => {
                let generation = now_s / period + 1;
                if held.generation == generation
                    && held.keys[(generation & 1) as usize] == derive(master, generation)
                {
                    return Ok(None);
                }
                let mut keys = [[0; 2]; 2];
                keys[(generation & 1) as usize] = derive(master, generation);
                keys[((generation - 1) & 1) as usize] = derive(master, generation - 1);
                Ok(Some(CookieSecrets {
                    keys,
                    generation,
                    previous_until_s: (generation - 1) * period + COOKIE_LIFETIME_S,
                }))
            }
            Source::Random if held.generation == 0 || held.keys == [[0; 2]; 2] => {
                self.next_rotation_s = now_s + period;
                let mut fresh = CookieSecrets::new([0; 2]);
                fresh.rotate(random_key()?, 0);
                Ok(Some(fresh))
            }
            Source::Random if now_s >= self.next_rotation_s => {
                self.next_rotation_s = now_s + period;
                let mut rotated = *held;
                rotated.rotate(random_key()?, now_s + COOKIE_LIFETIME_S);
                Ok(Some(rotated))
            }
            Source::Random => Ok(None),
        }
    }
}

/// The key of generation `generation` from a shared `master` secret.
fn derive(master: [u64; 2], generation: u64) -> [u64; 2] {
    [
        siphash24(master, &[generation, 0, 0, 0, 0, 0]),
        siphash24(master, &[generation, 1, 0, 0, 0, 0]),
    ]
}

fn random_key() -> Result<[u64; 2], CookieError> {
    let mut bytes = [0u8; 16];
    io::Read::read_exact(
        &mut fs::File::open("/dev/urandom").map_err(CookieError::Random)?,
        &mut bytes,
    )
    .map_err(CookieError::Random)?;
    Ok(split(bytes))
}

fn split(bytes: [u8; 16]) -> [u64; 2] {
    let (first, second) = bytes.split_at(8);
    [
        u64::from_le_bytes(first.try_into().unwrap_or_default()),
        u64::from_le_bytes(second.try_into().unwrap_or_default()),
    ]
}

/// 32 hex digits (surrounding white space ignored), read with a size limit. Errors name the
/// file, never what it holds.
fn read_secret(path: &Path) -> Result<[u64; 2], CookieError> {
    let read_error = |source| CookieError::ReadSecret {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    io::Read::read_to_string(
        &mut io::Read::take(fs::File::open(path).map_err(read_error)?, SECRET_FILE_LIMIT),
        &mut text,
    )
    .map_err(read_error)?;
    let digits = text.trim();
    let bad = || CookieError::BadSecret {
        path: path.to_owned(),
    };
    if digits.len() != 32 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(split(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_file(text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "tcpguard-secret-{}-{}",
            std::process::id(),
            text.len()
        ));
        fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn hosts_sharing_a_file_derive_the_same_keys_and_rotate_together() {
        let path = secret_file("00112233445566778899aabbccddeeff\n");
        let hour = Duration::from_secs(3600);
        let mut a = KeyRing::new(Some(&path), hour).unwrap();
        let mut b = KeyRing::new(Some(&path), hour).unwrap();
        let empty = CookieSecrets::new([0; 2]);
        let now = 1_800_000_000;
        let from_a = a.update(&empty, now).unwrap().unwrap();
        let from_b = b.update(&empty, now + 5).unwrap().unwrap();
        assert_eq!(
            (from_a.keys, from_a.generation),
            (from_b.keys, from_b.generation)
        );
        assert_eq!(
            a.update(&from_a, now + 10).unwrap().map(|s| s.generation),
            None,
            "unchanged within the hour"
        );
        let next = a.update(&from_a, now + 3600).unwrap().unwrap();
        assert_eq!(next.generation, from_a.generation + 1);
        let current = (from_a.generation & 1) as usize;
        assert_eq!(
            next.keys[current], from_a.keys[current],
            "the previous key stays"
        );
        assert!(
            next.previous_until_s > now + 3600 - 3600
                && next.previous_until_s <= now + 3600 + COOKIE_LIFETIME_S
        );
        fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_secret_file_must_hold_128_bits_of_hex_and_errors_do_not_show_it() {
        for text in [
            "",
            "0011",
            "zz112233445566778899aabbccddeeff",
            "00112233445566778899aabbccddeeff00",
        ] {
            let path = secret_file(text);
            let error = KeyRing::new(Some(&path), Duration::from_secs(3600))
                .err()
                .expect(text)
                .to_string();
            assert!(error.contains("32 hex digits"), "{error}");
            if !text.is_empty() {
                assert!(
                    !error.contains(text),
                    "the secret is not in the message: {error}"
                );
            }
            fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn random_keys_start_at_generation_one_and_rotate_on_time() {
        let mut ring = KeyRing::new(None, Duration::from_secs(600)).unwrap();
        let now = tai_now_s();
        let first = ring
            .update(&CookieSecrets::new([0; 2]), now)
            .unwrap()
            .unwrap();
        assert_eq!(first.generation, 1);
        assert_ne!(first.keys[1], [0; 2]);
        assert!(
            ring.update(&first, now + 1).unwrap().is_none(),
            "an adopted key is kept"
        );
        let rotated = ring.update(&first, now + 600).unwrap().unwrap();
        assert_eq!(rotated.generation, 2);
        assert_eq!(rotated.keys[1], first.keys[1], "the previous key is kept");
        assert_eq!(rotated.previous_until_s, now + 600 + COOKIE_LIFETIME_S);
    }
}
