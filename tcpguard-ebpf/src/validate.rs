//! Checks a segment to a protected port must pass before it is judged by its flags.

use tcpguard_common::{Counter, tcp::validate_flags};

use crate::parse::Segment;

/// Fragments first, then the header's own length, then the flags.
#[inline(always)]
pub fn segment(segment: &Segment) -> Result<(), Counter> {
    if segment.fragment {
        return Err(Counter::Fragment);
    }
    let header_len = usize::from(segment.data_offset) * 4;
    if header_len < 20 || header_len > segment.l4_len {
        return Err(Counter::BadDataOffset);
    }
    validate_flags(segment.flags)
}
