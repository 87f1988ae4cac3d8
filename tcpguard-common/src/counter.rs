//! Every verdict the XDP program reaches is counted under exactly one [`Counter`]; the daemon
//! reads them from a per-CPU array indexed by the counter's value.

/// What a counted packet had done to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    /// Handed to the kernel's stack.
    Pass,
    /// Answered from XDP (a SYN-ACK sent back with XDP_TX).
    Answer,
    /// Dropped in XDP.
    Drop,
}

macro_rules! counters {
    ($($variant:ident = $name:literal, $kind:ident, $help:literal;)+) => {
        /// Index of a per-CPU verdict counter.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $(#[doc = $help] $variant,)+
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];

            /// The counter's label value: lower case, stable, used in logs and metrics.
            pub const fn name(self) -> &'static str {
                match self { $(Self::$variant => $name,)+ }
            }

            pub const fn kind(self) -> CounterKind {
                match self { $(Self::$variant => CounterKind::$kind,)+ }
            }

            /// One sentence saying when a packet lands here.
            pub const fn help(self) -> &'static str {
                match self { $(Self::$variant => $help,)+ }
            }
        }
    };
}

counters! {
    NotIp = "not_ip", Pass, "Neither IPv4 nor IPv6.";
    NotTcp = "not_tcp", Pass, "IP but not TCP.";
    Unprotected = "unprotected", Pass, "TCP to a port that is not protected.";
    LaterFragment = "later_fragment", Pass, "A non-first IP fragment: it carries no TCP header, and without its first fragment (dropped when aimed at a protected port) it is never reassembled.";
    KnownSocket = "known_socket", Pass, "A segment of a connection the kernel already has a socket for.";
    NoListener = "no_listener", Pass, "A SYN to a protected port nobody listens on; the kernel answers it as it would without tcpguard.";
    CookieUnavailable = "cookie_unavailable", Pass, "The kernel would not make a SYN cookie (net.ipv4.tcp_syncookies is not 2); the SYN goes to the kernel.";
    CookieAccepted = "cookie_accepted", Pass, "An ACK carrying a valid SYN cookie (data or a FIN may come with it); the kernel builds the connection from it. With tcpguard's own cookies, a later segment that returns the cookie again, because the kernel dropped the first, counts again.";
    TrackedFlow = "tracked_flow", Pass, "A segment of a connection tcpguard tracks in its flow map.";
    AllowedSource = "allowed_source", Pass, "A SYN from an allow-listed source, handed to the kernel without a cookie round trip.";
    SynCookieSent = "syn_cookie_sent", Answer, "A SYN answered with a SYN cookie SYN-ACK from XDP.";
    SynNoAttack = "syn_no_attack", Pass, "A SYN outside an attack (cookies only under attack): the kernel answers it with its normal handshake.";
    KernelHandshake = "kernel_handshake", Pass, "An ACK completing a handshake the kernel answered itself outside an attack; the connection is tracked from here.";
    Truncated = "truncated", Drop, "A header ends past the end of the frame.";
    BadIpVersion = "bad_ip_version", Drop, "The IP version field does not match the EtherType.";
    BadIpHeaderLength = "bad_ip_header_length", Drop, "IPv4 header length (IHL) below 5 words.";
    BadIpTotalLength = "bad_ip_total_length", Drop, "IP total or payload length beyond the frame or shorter than the headers.";
    ExtensionHeaderChain = "extension_header_chain", Pass, "More IPv6 extension headers than tcpguard walks: the port behind them is unknown, so the packet goes to the kernel, which accepts such chains.";
    Fragment = "fragment", Drop, "The first fragment of a fragmented segment to a protected port.";
    BadDataOffset = "bad_data_offset", Drop, "TCP data offset below 5 words or beyond the segment.";
    NullFlags = "null_flags", Drop, "TCP segment with no flags set (NULL scan).";
    XmasFlags = "xmas_flags", Drop, "TCP segment with FIN, URG and PSH set (XMAS scan).";
    SynFin = "syn_fin", Drop, "TCP segment with SYN and FIN set.";
    SynRst = "syn_rst", Drop, "TCP segment with SYN and RST set.";
    FinWithoutAck = "fin_without_ack", Drop, "TCP FIN without ACK.";
    BadFlags = "bad_flags", Drop, "Another TCP flag combination that TCP never sends.";
    CookieRejected = "cookie_rejected", Drop, "An ACK for no known connection whose SYN cookie is invalid (ACK flood).";
    NoConnection = "no_connection", Drop, "A FIN, RST or ACK to a protected port for which no connection or listener exists.";
    DeniedSource = "denied_source", Drop, "A segment from a deny-listed source.";
    SourceLimit = "source_limit", Drop, "A SYN from a source that already has as many tracked connections as it may have.";
    SynAckFailed = "syn_ack_failed", Drop, "A SYN whose SYN-ACK could not be built in place (no room in the frame).";
    OtherMac = "other_mac", Pass, "A frame to a protected port not sent to the interface's own unicast MAC; the kernel treats it as without tcpguard.";
    NotHostAddress = "not_host_address", Pass, "A segment to a protected port of an address the host does not own (forwarded traffic); the kernel routes it as without tcpguard.";
    MartianAddress = "martian_address", Pass, "A segment from or to a martian address (loopback, multicast, broadcast, unspecified, IPv4-mapped, or the host's own address as source); the kernel drops it as without tcpguard.";
    SourceRouted = "source_routed", Pass, "A segment with an IPv4 source-route option or an IPv6 routing header with segments left: not for a local socket; the kernel handles it as without tcpguard.";
    BadIpOptions = "bad_ip_options", Pass, "A SYN whose IPv4 options are malformed; the kernel drops it as without tcpguard.";
    CookieBadTimestamp = "cookie_bad_timestamp", Drop, "An ACK for no known connection whose own-cookie ISN checks but whose echoed timestamp does not.";
    CookieRetiredKey = "cookie_retired_key", Drop, "An ACK whose own cookie was made with a key retired since (older than two cookie periods after a rotation).";
    CookieHandoverFailed = "cookie_handover_failed", Drop, "An ACK with a valid own cookie that XDP could not hand to the TC ingress program (the driver keeps no XDP metadata); without it the kernel would answer with a RST.";
    BadChecksum = "bad_checksum", Pass, "A SYN whose IPv4 header or TCP checksum is wrong; the kernel drops it as without tcpguard.";
}

impl Counter {
    /// Number of counters: the length of the per-CPU array.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn index(self) -> u32 {
        self as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_follow_the_table_order() {
        for (position, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(counter.index() as usize, position, "{counter:?}");
        }
    }

    #[test]
    fn names_are_unique_prometheus_label_values() {
        for (i, a) in Counter::ALL.iter().enumerate() {
            assert!(
                a.name()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{a:?}"
            );
            for b in &Counter::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
