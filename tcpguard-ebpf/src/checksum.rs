//! The Internet checksum (RFC 1071), summed 32 bits at a time in the machine's byte order. The
//! one's complement sum comes out the same whichever order the bytes are added in, only
//! byte-swapped (RFC 1071 §2(B)), so a sum taken in the machine's order is stored back in it.

/// Adds `bytes` (a multiple of 4 long) to a running sum.
#[inline(always)]
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
