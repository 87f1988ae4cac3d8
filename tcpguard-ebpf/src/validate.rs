//! Checks a segment to a protected port must pass before it is judged by its flags.

use tcpguard_common::{
    Counter,
    tcp_flags::{ACK, FIN, PSH, RST, SYN, URG},
};

use crate::parse::Segment;

/// The flags that decide validity; PSH, ECE and CWR may accompany any valid combination.
const JUDGED_FLAGS: u8 = FIN | SYN | RST | ACK | URG;

/// The combinations TCP sends, as netfilter's conntrack lists them (`tcp_valid_flags`): bit `n`
/// is set when the judged flags `n` are valid.
const VALID_COMBINATIONS: u64 = (1 << SYN)
    | (1 << (SYN | URG))
    | (1 << (SYN | ACK))
    | (1 << RST)
    | (1 << (RST | ACK))
    | (1 << (FIN | ACK))
    | (1 << (FIN | ACK | URG))
    | (1 << ACK)
    | (1 << (ACK | URG));

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
    flags(segment.flags)
}

#[inline(always)]
pub fn flags(flags: u8) -> Result<(), Counter> {
    let judged = flags & JUDGED_FLAGS;
    if VALID_COMBINATIONS & (1 << judged) != 0 {
        return Ok(());
    }
    Err(if judged == 0 {
        Counter::NullFlags
    } else if judged & (SYN | FIN) == SYN | FIN {
        Counter::SynFin
    } else if judged & (SYN | RST) == SYN | RST {
        Counter::SynRst
    } else if flags & (FIN | PSH | URG) == FIN | PSH | URG {
        Counter::XmasFlags
    } else if judged & (FIN | ACK) == FIN {
        Counter::FinWithoutAck
    } else {
        Counter::BadFlags
    })
}
