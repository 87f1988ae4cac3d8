//! tcpguard's keyed SYN cookie: the server ISN of a SYN-ACK that lets the final ACK of the
//! handshake prove the SYN was answered, without any state kept between the two.
//!
//! Server ISN, from bit 31 down:
//!
//! | bits  | width | content                                                        |
//! |-------|-------|----------------------------------------------------------------|
//! | 31–11 | 21    | low 21 bits of `h`                                             |
//! | 10    | 1     | key-generation parity ([`CookieSecrets::generation`] & 1)      |
//! | 9     | 1     | time-counter parity                                            |
//! | 8–6   | 3     | MSS index ([`MSS_TABLE_V4`], [`MSS_TABLE_V6`])                 |
//! | 5     | 1     | ECN                                                            |
//! | 4     | 1     | SACK-permitted                                                 |
//! | 3–0   | 4     | client's window scale, 0..=14, or [`WSCALE_NONE`]              |
//!
//! `h` is SipHash-2-4 under a 128-bit key over little-endian words. IPv6, six words: client
//! address bytes 0..8 and 8..16, server address bytes 0..8 and 8..16, then the two words both
//! families end with. IPv4, three words: `server_address << 32 | client_address` (each as its
//! four bytes read little-endian), then those two: `client_port << 48 | server_port << 32 |
//! client_isn`, and `counter << 17 | family << 9 | option_bits` (the ISN's low 9 bits; the family
//! byte fills bits 9–16, so the counter starts at 17). The message length (24 or 48 bytes) is
//! part of SipHash's last block, and the family is hashed, so an IPv4 message is never an IPv6
//! one. IPv4 hashes half the words, which is a third fewer SipHash rounds on the SYN path. When
//! the client sent timestamps, the SYN-ACK's TSval is `h >> 32` and the ACK's TSecr must echo it.
//!
//! Time: `counter = TAI seconds / COOKIE_PERIOD_S` (64 s; its low 47 bits are hashed, which
//! repeat after 2.8·10^8 years). A cookie is accepted in the period it was made and the next, so
//! for 64 to 128 s. The time parity says which of those two counters to hash, the key parity
//! which of two keys, so a check costs one hash.
//!
//! Forgery: every ISN names exactly one key, counter and option set, so a forged ACK passes with
//! probability 2^-21. An ACK with a timestamp is checked on 53 bits, but the attacker may leave
//! the option out, so 2^-21 is the bound. Linux's cookie takes an ACK whose 8-bit counter is one
//! of ≈ 3 of 256 and whose 24-bit remainder is one of 4 MSS indices of 2^24: ≈ 12 / 2^32 ≈
//! 2^-28.4. tcpguard gives up about 7 bits of check so that window scale, SACK and ECN survive
//! the cookie when the client sends no timestamps.
//!
//! Keys: the daemon draws one per host from the OS random generator, or loads one shared by the
//! hosts behind one address so that any of them can check another's cookies, and rotates it; see
//! [`CookieSecrets`]. An all-zero key is public: the map must be written before cookies are sent.
//!
//! Everything here is straight-line code over fixed-size values, `#[inline(always)]`, so that it
//! builds for the BPF target and the verifier follows it without loops or bounds checks.

use core::fmt;

use crate::{FLOW_IPV6, FlowKey};

/// Length of a cookie period, seconds of TAI.
pub const COOKIE_PERIOD_S: u64 = 64;
/// The longest a cookie stays valid: the period it was made in and the next. A retired key must
/// stay accepted this long after a rotation for every outstanding cookie to be honoured.
pub const COOKIE_LIFETIME_S: u64 = 2 * COOKIE_PERIOD_S;

/// MSS values an IPv4 cookie can encode (Linux's `msstab` has 4; tcpguard spends 3 bits).
pub const MSS_TABLE_V4: [u16; 8] = [536, 1200, 1300, 1360, 1400, 1440, 1452, 1460];
/// MSS values an IPv6 cookie can encode; 1220 is the IPv6 minimum MTU's MSS.
pub const MSS_TABLE_V6: [u16; 8] = [1220, 1280, 1340, 1380, 1400, 1420, 1432, 1440];

/// [`CookieOptions::window_scale`] when the client's SYN carried no window scale option.
pub const WSCALE_NONE: u8 = 15;

/// Bits of the ISN that carry hash.
const HASH_BITS: u32 = 21;
const HASH_MASK: u32 = (1 << HASH_BITS) - 1;
const HASH_SHIFT: u32 = 32 - HASH_BITS;
const KEY_PARITY_SHIFT: u32 = 10;
const TIME_PARITY_SHIFT: u32 = 9;
/// The ISN's low 9 bits: MSS index, ECN, SACK, window scale.
const OPTION_MASK: u32 = 0x1ff;

/// What a SYN asked for that a socket built from the cookie ACK must honour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CookieOptions {
    /// Index into [`MSS_TABLE_V4`] or [`MSS_TABLE_V6`], 0..=7; see [`mss_index`].
    pub mss_index: u8,
    /// The client's window shift count, 0..=14 (RFC 7323 §2.3: larger is read as 14), or
    /// [`WSCALE_NONE`].
    pub window_scale: u8,
    /// The client sent SACK-permitted.
    pub sack: bool,
    /// The client asked for ECN (ECE and CWR set on the SYN).
    pub ecn: bool,
    /// The client sent timestamps. Not in the ISN: the ACK's own timestamp option says it, and
    /// its TSecr is checked against the TSval the cookie set.
    pub timestamps: bool,
}

impl CookieOptions {
    /// The ISN's low 9 bits. `timestamps` is not among them.
    #[inline(always)]
    pub fn bits(self) -> u32 {
        (u32::from(self.mss_index) & 7) << 6
            | u32::from(self.ecn) << 5
            | u32::from(self.sack) << 4
            | u32::from(self.window_scale) & 15
    }

    /// The options in an ISN's low 9 bits, with `timestamps` off.
    #[inline(always)]
    pub fn from_bits(bits: u32) -> Self {
        Self {
            mss_index: (bits >> 6 & 7) as u8,
            window_scale: (bits & 15) as u8,
            sack: bits >> 4 & 1 != 0,
            ecn: bits >> 5 & 1 != 0,
            timestamps: false,
        }
    }
}

/// The server's side of the handshake as the SYN-ACK carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynCookie {
    /// The SYN-ACK's sequence number.
    pub isn: u32,
    /// The SYN-ACK's TSval when the client sent timestamps, else 0.
    pub tsval: u32,
}

/// Why an ACK's cookie was refused. Each is a drop counter.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CookieReject {
    /// The ISN's hash bits do not match: forged, too old, or for another flow.
    Hash = 0,
    /// The ISN matches but the TSecr does not echo the cookie's TSval.
    Timestamp = 1,
    /// A genuine cookie whose key was retired (rotated out more than the grace period ago).
    RetiredKey = 2,
}

/// The cookie keys, the value of a single-entry array map the daemon writes.
///
/// Two slots, indexed by generation parity: the current key and the one before it. To rotate,
/// the daemon writes the new key into the other slot, bumps `generation`, and sets
/// `previous_until_s` to now + [`COOKIE_LIFETIME_S`] so that cookies already sent stay valid.
/// Rotating again within that time overwrites the previous key and refuses its cookies.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CookieSecrets {
    /// SipHash keys (k0, k1), slot = generation & 1.
    pub keys: [[u64; 2]; 2],
    /// The current generation; cookies are made with `keys[generation & 1]`.
    pub generation: u64,
    /// TAI seconds until which the previous generation's key is still accepted; 0: it is not.
    pub previous_until_s: u64,
}

impl CookieSecrets {
    /// Generation 0 with `key`; no previous key is accepted.
    pub const fn new(key: [u64; 2]) -> Self {
        Self {
            keys: [key, [0; 2]],
            generation: 0,
            previous_until_s: 0,
        }
    }

    /// The key cookies are made with, and its parity for the ISN.
    #[inline(always)]
    pub fn current(&self) -> ([u64; 2], u32) {
        let parity = (self.generation & 1) as u32;
        (self.slot(parity), parity)
    }

    /// The key of a cookie whose ISN carries key parity `parity`, at TAI second `now_s`:
    /// [`CookieReject::RetiredKey`] when that is the previous key and its grace has run out.
    #[inline(always)]
    pub fn key_for(&self, parity: u32, now_s: u64) -> Result<[u64; 2], CookieReject> {
        if self.accepts(parity, now_s) {
            Ok(self.slot(parity))
        } else {
            Err(CookieReject::RetiredKey)
        }
    }

    /// Makes `key` the current key, keeping the current one as the previous key until
    /// `previous_until_s`.
    pub fn rotate(&mut self, key: [u64; 2], previous_until_s: u64) {
        let generation = self.generation.wrapping_add(1);
        if generation & 1 == 0 {
            self.keys[0] = key;
        } else {
            self.keys[1] = key;
        }
        self.generation = generation;
        self.previous_until_s = previous_until_s;
    }

    #[inline(always)]
    fn accepts(&self, parity: u32, now_s: u64) -> bool {
        parity & 1 == (self.generation & 1) as u32 || now_s < self.previous_until_s
    }

    /// Constant indices only: the verifier need not prove a bound.
    #[inline(always)]
    fn slot(&self, parity: u32) -> [u64; 2] {
        if parity & 1 == 0 {
            self.keys[0]
        } else {
            self.keys[1]
        }
    }
}

/// By hand, so that logging the map value never prints a key.
impl fmt::Debug for CookieSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CookieSecrets")
            .field("generation", &self.generation)
            .field("previous_until_s", &self.previous_until_s)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], u64s only, no padding.
unsafe impl aya::Pod for CookieSecrets {}

/// The MSS table of `family` ([`crate::FLOW_IPV4`] or [`crate::FLOW_IPV6`]), by value: with
/// constant indices its entries become immediates, where a reference or a variable index would
/// leave the tables in .rodata and the verifier to bound a pointer into them.
#[inline(always)]
fn mss_table(family: u8) -> [u16; 8] {
    if family == FLOW_IPV6 {
        MSS_TABLE_V6
    } else {
        MSS_TABLE_V4
    }
}

/// The index of the largest table entry not above the client's `offered` MSS (0: no MSS
/// option). An offer below every entry gets index 0, as in Linux: the client then receives
/// segments larger than it asked for, but no smaller MSS is worth a code point.
#[inline(always)]
pub fn mss_index(family: u8, offered: u16) -> u8 {
    let table = mss_table(family);
    // The table is sorted, so counting the entries 1..8 at or below the offer finds the index
    // without a loop.
    u8::from(offered >= table[1])
        + u8::from(offered >= table[2])
        + u8::from(offered >= table[3])
        + u8::from(offered >= table[4])
        + u8::from(offered >= table[5])
        + u8::from(offered >= table[6])
        + u8::from(offered >= table[7])
}

/// The MSS that [`mss_index`] `index` stands for.
#[inline(always)]
pub fn mss_of(family: u8, index: u8) -> u16 {
    let table = mss_table(family);
    match index & 7 {
        0 => table[0],
        1 => table[1],
        2 => table[2],
        3 => table[3],
        4 => table[4],
        5 => table[5],
        6 => table[6],
        _ => table[7],
    }
}

/// SipHash state (Aumasson and Bernstein, 2012), message words fed one at a time.
struct Sip {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
}

impl Sip {
    #[inline(always)]
    fn new(key: [u64; 2]) -> Self {
        Self {
            v0: key[0] ^ 0x736f_6d65_7073_6575,
            v1: key[1] ^ 0x646f_7261_6e64_6f6d,
            v2: key[0] ^ 0x6c79_6765_6e65_7261,
            v3: key[1] ^ 0x7465_6462_7974_6573,
        }
    }

    #[inline(always)]
    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13) ^ self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16) ^ self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21) ^ self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17) ^ self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    /// One message word, two compression rounds.
    #[inline(always)]
    fn compress(&mut self, word: u64) {
        self.v3 ^= word;
        self.round();
        self.round();
        self.v0 ^= word;
    }

    /// Four finalization rounds. The caller has fed the length word.
    #[inline(always)]
    fn finish(mut self) -> u64 {
        self.v2 ^= 0xff;
        self.round();
        self.round();
        self.round();
        self.round();
        self.v0 ^ self.v1 ^ self.v2 ^ self.v3
    }
}

/// SipHash-2-4 under `key` (k0, k1) of the `8 * N` bytes that `words` hold little-endian.
#[inline(always)]
pub fn siphash24<const N: usize>(key: [u64; 2], words: &[u64; N]) -> u64 {
    let mut sip = Sip::new(key);
    for &word in words {
        sip.compress(word);
    }
    // The last block: message length in the top byte, no bytes left over.
    sip.compress(((8 * N) as u64) << 56);
    sip.finish()
}

/// `h` of the cookie for `flow`: see the module's documentation for the words hashed.
#[inline(always)]
fn hash(key: [u64; 2], flow: &FlowKey, client_isn: u32, counter: u64, option_bits: u32) -> u64 {
    let ports_isn = u64::from(flow.client_port) << 48
        | u64::from(flow.server_port) << 32
        | u64::from(client_isn);
    let time_options =
        counter << 17 | u64::from(flow.family) << 9 | u64::from(option_bits & OPTION_MASK);
    let c = &flow.client_addr;
    let s = &flow.server_addr;
    if flow.family == FLOW_IPV6 {
        siphash24(
            key,
            &[
                u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]),
                u64::from_le_bytes([c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15]]),
                u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]),
                u64::from_le_bytes([s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]]),
                ports_isn,
                time_options,
            ],
        )
    } else {
        siphash24(
            key,
            &[
                u64::from_le_bytes([c[0], c[1], c[2], c[3], s[0], s[1], s[2], s[3]]),
                ports_isn,
                time_options,
            ],
        )
    }
}

/// The cookie for a SYN of `flow` with sequence number `client_isn` and `options`, at TAI second
/// `now_s`.
#[inline(always)]
pub fn make(
    secrets: &CookieSecrets,
    now_s: u64,
    flow: &FlowKey,
    client_isn: u32,
    options: CookieOptions,
) -> SynCookie {
    let (key, key_parity) = secrets.current();
    let counter = now_s / COOKIE_PERIOD_S;
    let bits = options.bits();
    let h = hash(key, flow, client_isn, counter, bits);
    SynCookie {
        isn: (h as u32 & HASH_MASK) << HASH_SHIFT
            | key_parity << KEY_PARITY_SHIFT
            | ((counter & 1) as u32) << TIME_PARITY_SHIFT
            | bits,
        tsval: if options.timestamps {
            (h >> 32) as u32
        } else {
            0
        },
    }
}

/// Checks the cookie an ACK of `flow` returns at TAI second `now_s`: `ack_seq` is the client's
/// ISN + 1, `ack_ack` the server's. `has_timestamp` says whether the ACK carries a timestamp
/// option, whose echo reply is `tsecr` (plain values rather than an `Option`, whose undefined
/// payload the verifier would refuse to read).
///
/// Returns the options the SYN asked for, with `timestamps` as the ACK says.
#[inline(always)]
pub fn check(
    secrets: &CookieSecrets,
    now_s: u64,
    flow: &FlowKey,
    ack_seq: u32,
    ack_ack: u32,
    has_timestamp: bool,
    tsecr: u32,
) -> Result<CookieOptions, CookieReject> {
    let client_isn = ack_seq.wrapping_sub(1);
    let isn = ack_ack.wrapping_sub(1);
    let key_parity = isn >> KEY_PARITY_SHIFT & 1;
    // Of the two counters a live cookie can come from, now's and the one before, exactly one
    // has the parity the ISN carries.
    let now_counter = now_s / COOKIE_PERIOD_S;
    let counter = if (now_counter & 1) as u32 == isn >> TIME_PARITY_SHIFT & 1 {
        now_counter
    } else {
        now_counter.wrapping_sub(1)
    };
    let bits = isn & OPTION_MASK;
    // Hashed under the retired key too, so that RetiredKey counts genuine late cookies only.
    let h = hash(secrets.slot(key_parity), flow, client_isn, counter, bits);
    if h as u32 & HASH_MASK != isn >> HASH_SHIFT {
        return Err(CookieReject::Hash);
    }
    if has_timestamp && tsecr != (h >> 32) as u32 {
        return Err(CookieReject::Timestamp);
    }
    if !secrets.accepts(key_parity, now_s) {
        return Err(CookieReject::RetiredKey);
    }
    let mut options = CookieOptions::from_bits(bits);
    options.timestamps = has_timestamp;
    Ok(options)
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::{format, println, vec::Vec};

    use proptest::{
        prelude::*,
        test_runner::{Config, RngSeed},
    };

    use super::*;
    use crate::FLOW_IPV4;

    /// No regression files: a failure prints its input instead.
    fn config(cases: u32) -> Config {
        Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        }
    }

    /// For properties that assert a refusal without timestamps, which a correct cookie misses
    /// with probability 2^-21 per check: a fixed seed keeps such a test from flaking while still
    /// failing every run when the code is wrong.
    fn fixed_config(cases: u32) -> Config {
        Config {
            rng_seed: RngSeed::Fixed(0x7c95_c00c),
            ..config(cases)
        }
    }

    fn flow() -> impl Strategy<Value = FlowKey> {
        (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<u16>(),
            any::<bool>(),
        )
            .prop_map(|(mut client, mut server, client_port, server_port, v6)| {
                if !v6 {
                    client[4..].fill(0);
                    server[4..].fill(0);
                }
                FlowKey {
                    client_addr: client,
                    server_addr: server,
                    client_port,
                    server_port,
                    family: if v6 { FLOW_IPV6 } else { FLOW_IPV4 },
                    _pad: [0; 3],
                }
            })
    }

    fn secrets() -> impl Strategy<Value = CookieSecrets> {
        (any::<[[u64; 2]; 2]>(), any::<u64>()).prop_map(|(keys, generation)| CookieSecrets {
            keys,
            generation,
            previous_until_s: 0,
        })
    }

    fn options() -> impl Strategy<Value = CookieOptions> {
        (0..8u8, 0..16u8, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(mss_index, window_scale, sack, ecn, timestamps)| CookieOptions {
                mss_index,
                window_scale,
                sack,
                ecn,
                timestamps,
            },
        )
    }

    /// TAI seconds up to ~35 000 years.
    fn now() -> impl Strategy<Value = u64> {
        0..1u64 << 40
    }

    fn all_options() -> Vec<CookieOptions> {
        let mut all = Vec::new();
        for mss_index in 0..8 {
            for window_scale in 0..16 {
                for bits in 0..8 {
                    all.push(CookieOptions {
                        mss_index,
                        window_scale,
                        sack: bits & 1 != 0,
                        ecn: bits & 2 != 0,
                        timestamps: bits & 4 != 0,
                    });
                }
            }
        }
        all
    }

    /// Checks the ACK a client answering `cookie` sends.
    fn check_answer(
        secrets: &CookieSecrets,
        now_s: u64,
        flow: &FlowKey,
        client_isn: u32,
        cookie: SynCookie,
        timestamps: bool,
    ) -> Result<CookieOptions, CookieReject> {
        check(
            secrets,
            now_s,
            flow,
            client_isn.wrapping_add(1),
            cookie.isn.wrapping_add(1),
            timestamps,
            cookie.tsval,
        )
    }

    fn reference_siphash(key: [u64; 2], bytes: &[u8]) -> u64 {
        use core::hash::Hasher as _;
        let mut hasher = siphasher::sip::SipHasher24::new_with_keys(key[0], key[1]);
        hasher.write(bytes);
        hasher.finish()
    }

    #[test]
    fn siphash_matches_the_papers_test_vector() {
        // Appendix A of "SipHash: a fast short-input PRF": key 00..0f, message 00..0e.
        let key = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
        let mut sip = Sip::new(key);
        sip.compress(0x0706_0504_0302_0100);
        // Seven bytes left over, the length 15 in the top byte.
        sip.compress(15 << 56 | 0x000e_0d0c_0b0a_0908);
        assert_eq!(sip.finish(), 0xa129_ca61_49be_45e5);
        let message: Vec<u8> = (0..15).collect();
        assert_eq!(reference_siphash(key, &message), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn cookie_secrets_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<CookieSecrets>(), 48);
        assert_eq!(core::mem::align_of::<CookieSecrets>(), 8);
    }

    #[test]
    fn cookie_secrets_debug_prints_no_key() {
        let mut secrets = CookieSecrets::new([0x1111_2222_3333_4444, 0x5555_6666_7777_8888]);
        secrets.rotate([0x9999_aaaa_bbbb_cccc, 0xdddd_eeee_ffff_0101], 12345);
        let shown = format!("{secrets:?}");
        assert_eq!(
            shown,
            "CookieSecrets { generation: 1, previous_until_s: 12345, .. }"
        );
        let shown_hex = format!("{secrets:x?}");
        for word in secrets.keys.as_flattened() {
            assert!(!shown.contains(&format!("{word}")));
            assert!(!shown_hex.contains(&format!("{word:x}")));
        }
    }

    #[test]
    fn mss_index_picks_the_largest_entry_not_above_the_offer() {
        for (family, table) in [(FLOW_IPV4, MSS_TABLE_V4), (FLOW_IPV6, MSS_TABLE_V6)] {
            assert!(table.is_sorted());
            assert_eq!(mss_index(family, 0), 0, "no MSS option");
            assert_eq!(mss_of(family, 0), table[0]);
            for offered in 0..=u16::MAX {
                let index = mss_index(family, offered);
                let expected = table.iter().rposition(|&mss| mss <= offered).unwrap_or(0);
                assert_eq!(
                    usize::from(index),
                    expected,
                    "family {family} offer {offered}"
                );
                assert_eq!(mss_of(family, index), table[expected]);
            }
        }
    }

    #[test]
    fn options_round_trip_through_their_bits() {
        for options in all_options() {
            let bits = options.bits();
            assert!(bits <= OPTION_MASK);
            let decoded = CookieOptions::from_bits(bits);
            assert_eq!(
                decoded,
                CookieOptions {
                    timestamps: false,
                    ..options
                }
            );
        }
    }

    /// Connects the algorithm from its description: message bytes built from the documented
    /// layout, hashed by another SipHash implementation, give the same ISN and TSval.
    fn expected_cookie(
        secrets: &CookieSecrets,
        now_s: u64,
        flow: &FlowKey,
        client_isn: u32,
        options: CookieOptions,
    ) -> SynCookie {
        let generation = secrets.generation % 2;
        let key = secrets.keys[generation as usize];
        let counter = now_s / 64;
        let bits = u64::from(options.mss_index) << 6
            | u64::from(options.ecn) << 5
            | u64::from(options.sack) << 4
            | u64::from(options.window_scale);
        let address_len = if flow.family == FLOW_IPV6 { 16 } else { 4 };
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&flow.client_addr[..address_len]);
        bytes.extend_from_slice(&flow.server_addr[..address_len]);
        let ports = u64::from(flow.client_port) << 48
            | u64::from(flow.server_port) << 32
            | u64::from(client_isn);
        bytes.extend_from_slice(&ports.to_le_bytes());
        let last = counter << 17 | u64::from(flow.family) << 9 | bits;
        bytes.extend_from_slice(&last.to_le_bytes());
        let h = reference_siphash(key, &bytes);
        let isn = (h % (1 << 21)) << 11 | generation << 10 | (counter % 2) << 9 | bits;
        SynCookie {
            isn: isn as u32,
            tsval: if options.timestamps {
                (h >> 32) as u32
            } else {
                0
            },
        }
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn siphash_matches_siphasher_on_48_bytes(key in any::<[u64; 2]>(), words in any::<[u64; 6]>()) {
            let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_le_bytes()).collect();
            prop_assert_eq!(siphash24(key, &words), reference_siphash(key, &bytes));
        }

        #[test]
        fn siphash_matches_siphasher_on_24_bytes(key in any::<[u64; 2]>(), words in any::<[u64; 3]>()) {
            let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_le_bytes()).collect();
            prop_assert_eq!(siphash24(key, &words), reference_siphash(key, &bytes));
        }

        #[test]
        fn the_cookie_follows_the_documented_layout(
            secrets in secrets(),
            now_s in now(),
            flow in flow(),
            client_isn in any::<u32>(),
            options in options(),
        ) {
            prop_assert_eq!(
                make(&secrets, now_s, &flow, client_isn, options),
                expected_cookie(&secrets, now_s, &flow, client_isn, options)
            );
        }

        /// Flips every single bit of every input with timestamps on, where a wrong input passes
        /// with probability 2^-53 only.
        #[test]
        fn flipping_any_input_bit_fails_the_check_with_timestamps(
            secrets in secrets(),
            now_s in now(),
            flow in flow(),
            client_isn in any::<u32>(),
            options in options(),
        ) {
            let options = CookieOptions { timestamps: true, ..options };
            assert_every_flip_fails(&secrets, now_s, &flow, client_isn, options)?;
        }
    }

    proptest! {
        #![proptest_config(config(64))]

        #[test]
        fn every_option_combination_round_trips(
            secrets in secrets(),
            now_s in now(),
            flow in flow(),
            client_isn in any::<u32>(),
        ) {
            for family in [FLOW_IPV4, FLOW_IPV6] {
                let flow = FlowKey { family, ..flow };
                for options in all_options() {
                    let cookie = make(&secrets, now_s, &flow, client_isn, options);
                    prop_assert_eq!(cookie.isn & OPTION_MASK, options.bits());
                    let checked =
                        check_answer(&secrets, now_s, &flow, client_isn, cookie, options.timestamps);
                    prop_assert_eq!(checked, Ok(options));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(fixed_config(32))]

        #[test]
        fn flipping_any_input_bit_fails_the_check_without_timestamps(
            secrets in secrets(),
            now_s in now(),
            flow in flow(),
            client_isn in any::<u32>(),
            options in options(),
        ) {
            let options = CookieOptions { timestamps: false, ..options };
            assert_every_flip_fails(&secrets, now_s, &flow, client_isn, options)?;
        }

        #[test]
        fn a_cookie_lives_for_its_period_and_the_next(
            secrets in secrets(),
            now_s in now(),
            flow in flow(),
            client_isn in any::<u32>(),
            options in options(),
            later in 0..COOKIE_PERIOD_S,
            periods in 2..1_000u64,
        ) {
            let cookie = make(&secrets, now_s, &flow, client_isn, options);
            let start = now_s - now_s % COOKIE_PERIOD_S;
            let ts = options.timestamps;
            // Anywhere in the period it was made and the next.
            for checked_at in [now_s, start + later, start + COOKIE_PERIOD_S + later] {
                prop_assert_eq!(
                    check_answer(&secrets, checked_at, &flow, client_isn, cookie, ts),
                    Ok(options)
                );
            }
            let too_late = start + periods * COOKIE_PERIOD_S + later;
            prop_assert!(check_answer(&secrets, too_late, &flow, client_isn, cookie, ts).is_err());
            let checked_before = start.checked_sub(COOKIE_PERIOD_S - later);
            if let Some(too_early) = checked_before {
                prop_assert!(
                    check_answer(&secrets, too_early, &flow, client_isn, cookie, ts).is_err()
                );
            }
        }

        #[test]
        fn rotation_keeps_the_previous_key_until_its_time_only(
            first in any::<[u64; 2]>(),
            second in any::<[u64; 2]>(),
            third in any::<[u64; 2]>(),
            now_s in now(),
            flow in flow(),
            client_isn in any::<u32>(),
            options in options(),
            grace in 1..COOKIE_PERIOD_S,
        ) {
            let mut secrets = CookieSecrets::new(first);
            let cookie = make(&secrets, now_s, &flow, client_isn, options);
            let ts = options.timestamps;
            prop_assert_eq!(check_answer(&secrets, now_s, &flow, client_isn, cookie, ts), Ok(options));

            secrets.rotate(second, now_s + grace);
            for still in [now_s, now_s + grace - 1] {
                prop_assert_eq!(
                    check_answer(&secrets, still, &flow, client_isn, cookie, ts),
                    Ok(options)
                );
            }
            prop_assert_eq!(
                check_answer(&secrets, now_s + grace, &flow, client_isn, cookie, ts),
                Err(CookieReject::RetiredKey)
            );
            // The new key makes and checks its own cookies meanwhile.
            let fresh = make(&secrets, now_s, &flow, client_isn, options);
            prop_assert_eq!(check_answer(&secrets, now_s, &flow, client_isn, fresh, ts), Ok(options));

            // Two rotations on, the first key's slot holds the third key.
            secrets.rotate(third, u64::MAX);
            prop_assert_eq!(
                check_answer(&secrets, now_s, &flow, client_isn, cookie, ts),
                Err(CookieReject::Hash)
            );
            prop_assert_eq!(check_answer(&secrets, now_s, &flow, client_isn, fresh, ts), Ok(options));
        }
    }

    fn assert_every_flip_fails(
        secrets: &CookieSecrets,
        now_s: u64,
        flow: &FlowKey,
        client_isn: u32,
        options: CookieOptions,
    ) -> Result<(), TestCaseError> {
        let cookie = make(secrets, now_s, flow, client_isn, options);
        let ts = options.timestamps;
        let ack_seq = client_isn.wrapping_add(1);
        let ack_ack = cookie.isn.wrapping_add(1);
        let accepted = check(secrets, now_s, flow, ack_seq, ack_ack, ts, cookie.tsval);
        prop_assert_eq!(accepted, Ok(options));
        let refused =
            |secrets: &CookieSecrets, now_s, flow: &FlowKey, client_isn: u32, isn: u32, tsecr| {
                check(
                    secrets,
                    now_s,
                    flow,
                    client_isn.wrapping_add(1),
                    isn.wrapping_add(1),
                    ts,
                    tsecr,
                )
                .is_err()
            };

        // An IPv4 address is the first 4 bytes; the data plane leaves the rest zero.
        let address_len = if flow.family == FLOW_IPV6 { 16 } else { 4 };
        for byte in 0..address_len {
            for bit in 0..8 {
                let mut other = *flow;
                other.client_addr[byte] ^= 1 << bit;
                prop_assert!(refused(
                    secrets,
                    now_s,
                    &other,
                    client_isn,
                    cookie.isn,
                    cookie.tsval
                ));
                let mut other = *flow;
                other.server_addr[byte] ^= 1 << bit;
                prop_assert!(refused(
                    secrets,
                    now_s,
                    &other,
                    client_isn,
                    cookie.isn,
                    cookie.tsval
                ));
            }
        }
        for bit in 0..16 {
            let other = FlowKey {
                client_port: flow.client_port ^ 1 << bit,
                ..*flow
            };
            prop_assert!(refused(
                secrets,
                now_s,
                &other,
                client_isn,
                cookie.isn,
                cookie.tsval
            ));
            let other = FlowKey {
                server_port: flow.server_port ^ 1 << bit,
                ..*flow
            };
            prop_assert!(refused(
                secrets,
                now_s,
                &other,
                client_isn,
                cookie.isn,
                cookie.tsval
            ));
        }
        for bit in 0..8 {
            let other = FlowKey {
                family: flow.family ^ 1 << bit,
                ..*flow
            };
            prop_assert!(
                refused(secrets, now_s, &other, client_isn, cookie.isn, cookie.tsval),
                "family bit {bit}"
            );
        }
        for bit in 0..32 {
            let flipped = client_isn ^ 1 << bit;
            prop_assert!(refused(
                secrets,
                now_s,
                flow,
                flipped,
                cookie.isn,
                cookie.tsval
            ));
            // Hash bits, both parities, and every option bit of the server ISN.
            let flipped = cookie.isn ^ 1 << bit;
            prop_assert!(
                refused(secrets, now_s, flow, client_isn, flipped, cookie.tsval),
                "isn bit {bit}"
            );
            if ts {
                let flipped = cookie.tsval ^ 1 << bit;
                prop_assert_eq!(
                    check(secrets, now_s, flow, ack_seq, ack_ack, ts, flipped),
                    Err(CookieReject::Timestamp)
                );
            }
        }
        // Every hashed bit of the time counter, except flips that land in the cookie's window.
        let counter = now_s / COOKIE_PERIOD_S;
        for bit in 0..47 {
            let other = counter ^ 1 << bit;
            if other == counter + 1 {
                continue;
            }
            let then = other * COOKIE_PERIOD_S + now_s % COOKIE_PERIOD_S;
            prop_assert!(
                refused(secrets, then, flow, client_isn, cookie.isn, cookie.tsval),
                "counter bit {bit}"
            );
        }
        // Every bit of the key the cookie was made with, and the generation's parity.
        let (_, slot) = secrets.current();
        for word in 0..2 {
            for bit in 0..64 {
                let mut other = *secrets;
                other.keys[slot as usize][word] ^= 1 << bit;
                prop_assert!(refused(
                    &other,
                    now_s,
                    flow,
                    client_isn,
                    cookie.isn,
                    cookie.tsval
                ));
            }
        }
        let other = CookieSecrets {
            generation: secrets.generation ^ 1,
            ..*secrets
        };
        prop_assert!(refused(
            &other,
            now_s,
            flow,
            client_isn,
            cookie.isn,
            cookie.tsval
        ));
        Ok(())
    }

    /// splitmix64: a fixed stream, so the count below is the same every run.
    fn splitmix(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ z >> 30).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ z >> 27).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ z >> 31
    }

    #[test]
    fn random_acks_pass_no_more_often_than_the_forgery_bound() {
        const ACKS: u32 = 1_000_000;
        // Both keys accepted: the attacker's best case.
        let secrets = CookieSecrets {
            keys: [
                [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210],
                [0x0f1e_2d3c_4b5a_6978, 0x8796_a5b4_c3d2_e1f0],
            ],
            generation: 7,
            previous_until_s: u64::MAX,
        };
        let flow = FlowKey {
            client_addr: [198, 51, 100, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            server_addr: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            client_port: 40_000,
            server_port: 443,
            family: FLOW_IPV4,
            _pad: [0; 3],
        };
        let now_s = 1_750_000_000;
        let mut state = 0x5eed;
        let mut accepted = 0u32;
        for _ in 0..ACKS {
            let pair = splitmix(&mut state);
            if check(
                &secrets,
                now_s,
                &flow,
                pair as u32,
                (pair >> 32) as u32,
                false,
                0,
            )
            .is_ok()
            {
                accepted += 1;
            }
        }
        // Expected ACKS / 2^21 ≈ 0.48. For a Poisson count of that mean, P(count ≥ 9) ≈ 2·10^-9,
        // while a check of even 16 bits would let through ≈ 15.
        let expected = f64::from(ACKS) / f64::from(1u32 << HASH_BITS);
        println!("forged ACKs accepted: {accepted} of {ACKS} (expected {expected:.2})");
        assert!(accepted <= 8, "{accepted} forged ACKs accepted");
    }
}
