//! The Internet checksum (RFC 1071), summed 32 bits at a time in the machine's byte order. The
//! one's complement sum comes out the same whichever order the bytes are added in, only
//! byte-swapped (RFC 1071 §2(B)), so a sum taken in the machine's order is stored back in it.
//! Shared by the eBPF programs and tested on the host.

/// Adds `bytes` (a multiple of 4 long) to a running sum.
#[inline(always)]
// The eBPF target's nightly clippy predates the lint below.
#[allow(unknown_lints)]
#[allow(
    clippy::chunks_exact_to_as_chunks,
    reason = "with as_chunks the XDP program no longer passes the verifier"
)]
pub fn add(mut sum: u64, bytes: &[u8]) -> u64 {
    for word in bytes.chunks_exact(4) {
        sum += u64::from(u32::from_ne_bytes([word[0], word[1], word[2], word[3]]));
    }
    sum
}

/// Adds the last word of a TCP pseudo-header: zero, protocol 6, and the TCP length.
#[inline(always)]
pub fn add_tcp_pseudo_word(sum: u64, tcp_len: usize) -> u64 {
    let [high, low] = (tcp_len as u16).to_be_bytes();
    add(sum, &[0, 6, high, low])
}

/// The checksum field's bytes for a running sum.
#[inline(always)]
pub fn finish(mut sum: u64) -> [u8; 2] {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use proptest::prelude::*;

    use super::*;

    /// RFC 1071 as written: big-endian 16-bit words, end-around carry, complemented.
    fn reference(bytes: &[u8]) -> [u8; 2] {
        let mut sum: u32 = 0;
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
            sum = (sum & 0xffff) + (sum >> 16);
        }
        (!(sum as u16)).to_be_bytes()
    }

    /// The example of RFC 1071 §3: the words 0x0001 0xf203 0xf4f5 0xf6f7 sum to 0xddf2.
    #[test]
    fn rfc_1071_example() {
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(finish(add(0, &bytes)), (!0xddf2u16).to_be_bytes());
    }

    /// An IPv4 header whose checksum is right sums to zero (RFC 791), whatever its bytes.
    #[test]
    fn a_header_with_its_checksum_sums_to_zero() {
        // 10.0.0.1 -> 10.0.0.2, TTL 64, TCP, 40 bytes, DF; its checksum 0x26ce.
        let header = [
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0x26, 0xce, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        assert_eq!(finish(add(0, &header)), [0, 0]);
    }

    /// A sum of more than 2^16 all-ones words needs every fold `finish` makes.
    #[test]
    fn long_sums_fold_completely() {
        let bytes = vec![0xff; 4 * 70_000];
        assert_eq!(finish(add(0, &bytes)), reference(&bytes));
        let mut uneven = vec![0xff; 4 * 70_000];
        uneven[3] = 0xfe;
        assert_eq!(finish(add(0, &uneven)), reference(&uneven));
        // The running sum's worst carries: 0x0001_0000_ffff_ffff is 1 modulo 0xffff, which
        // only the last of the folds brings down to 16 bits.
        assert_eq!(finish(0x0001_0000_ffff_ffff), (!1u16).to_ne_bytes());
    }

    proptest! {
        #[test]
        fn equals_rfc_1071(words in proptest::collection::vec(any::<[u8; 4]>(), 0..400)) {
            let bytes: Vec<u8> = words.concat();
            prop_assert_eq!(finish(add(0, &bytes)), reference(&bytes));
        }

        #[test]
        fn the_pseudo_header_word_is_protocol_and_length(
            words in proptest::collection::vec(any::<[u8; 4]>(), 0..20),
            tcp_len in 0usize..65536,
        ) {
            let bytes: Vec<u8> = words.concat();
            let mut with_word = bytes.clone();
            with_word.extend_from_slice(&[0, 6]);
            with_word.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            prop_assert_eq!(
                finish(add_tcp_pseudo_word(add(0, &bytes), tcp_len)),
                reference(&with_word)
            );
        }
    }
}
