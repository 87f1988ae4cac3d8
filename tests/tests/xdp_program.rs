//! tcpguard's XDP program run by the kernel (BPF_PROG_TEST_RUN), inside a network namespace
//! each test makes, with a real listener there for the socket lookups and cookie helpers.
//! SYN-ACKs are judged by etherparse, not by tcpguard's own parser.

use std::net::{IpAddr, SocketAddr, TcpListener};

use etherparse::{LinkExtHeader, NetHeaders, PacketHeaders, TcpOptionElement, TransportHeader};
use tcpguard::Guard;
use tcpguard_common::{
    Counter, SynCookieConfig,
    cookie::{self, CookieOptions, CookieSecrets},
};
use tcpguard_tests::{
    frame::*,
    netns::in_fresh_netns,
    xdp::{self, XDP_DROP, XDP_PASS, XDP_TX},
};

const PORT: u16 = 8080;
const UNPROTECTED_PORT: u16 = 9090;

/// Listens on PORT (IPv4 and IPv6) in the current namespace and loads tcpguard protecting it.
fn listener_and_guard() -> (TcpListener, Guard) {
    let listener = TcpListener::bind(("::", PORT)).expect("listening on [::]:8080");
    (listener, xdp::load(&[PORT]))
}

/// Runs `frame` and asserts the verdict and the one counter that moved.
fn assert_verdict(guard: &Guard, frame: &[u8], action: u32, counter: Counter) -> Vec<u8> {
    let (outcome, moved) = xdp::run_counted(guard, frame);
    assert_eq!(
        outcome.action,
        action,
        "action for {counter:?}; counters moved: {:?}",
        moved.nonzero().collect::<Vec<_>>()
    );
    assert_eq!(
        moved.nonzero().collect::<Vec<_>>(),
        vec![(counter, 1)],
        "exactly one counter moves"
    );
    outcome.frame
}

fn monotonic_ms() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) / 1_000_000
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: now is a valid timespec.
    unsafe { libc::clock_gettime(clock, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// What a SYN-ACK said, for building the client's ACK.
struct SynAck {
    cookie: u32,
    tsval: Option<u32>,
}

/// Checks every field and checksum of the SYN-ACK answering `syn`.
/// `expected_mss` is the client's MSS rounded down to the kernel's cookie table for the family
/// (`msstab` in net/ipv4/syncookies.c: 536, 1300, 1440, 1460; `msstab` in net/ipv6/syncookies.c:
/// 1220, 1420, 1440, 8940), written out by each test.
fn assert_synack(
    syn: &TcpFrame,
    answer: &[u8],
    config: &SynCookieConfig,
    expected_mss: u16,
) -> SynAck {
    let headers = PacketHeaders::from_ethernet_slice(answer).expect("etherparse parses it");
    let ethernet = headers
        .link
        .clone()
        .and_then(|l| l.ethernet2())
        .expect("Ethernet II");
    assert_eq!(ethernet.source, syn.destination_mac);
    assert_eq!(ethernet.destination, syn.source_mac);
    let vlans: Vec<(u16, u16)> = headers
        .link_exts
        .iter()
        .map(|ext| match ext {
            LinkExtHeader::Vlan(vlan) => {
                let tci = vlan.to_bytes();
                (0, u16::from_be_bytes([tci[0], tci[1]]))
            }
            other => panic!("unexpected link extension {other:?}"),
        })
        .collect();
    assert_eq!(
        vlans.iter().map(|v| v.1).collect::<Vec<_>>(),
        syn.vlans.iter().map(|v| v.1).collect::<Vec<_>>(),
        "VLAN tags kept"
    );
    let Some(TransportHeader::Tcp(tcp)) = &headers.transport else {
        panic!("a TCP segment");
    };
    assert!(headers.payload.slice().is_empty(), "no payload");
    match (&headers.net, &syn.ip) {
        (
            Some(NetHeaders::Ipv4(ip, extensions)),
            Ip::V4 {
                source,
                destination,
                ..
            },
        ) => {
            assert!(extensions.is_empty());
            assert_eq!(ip.source, destination.octets());
            assert_eq!(ip.destination, source.octets());
            assert!(ip.options.is_empty(), "IPv4 options are not echoed");
            assert_eq!(usize::from(ip.total_len), 20 + tcp.header_len());
            assert_eq!(ip.time_to_live, config.ttl);
            assert!(ip.dont_fragment && !ip.more_fragments);
            assert_eq!(
                ip.header_checksum,
                ip.calc_header_checksum(),
                "IPv4 checksum"
            );
            assert_eq!(
                tcp.checksum,
                tcp.calc_checksum_ipv4(ip, &[]).unwrap(),
                "TCP checksum"
            );
        }
        (
            Some(NetHeaders::Ipv6(ip, extensions)),
            Ip::V6 {
                source,
                destination,
                ..
            },
        ) => {
            assert!(
                extensions.is_empty(),
                "IPv6 extension headers are not echoed"
            );
            assert_eq!(ip.source, destination.octets());
            assert_eq!(ip.destination, source.octets());
            assert_eq!(usize::from(ip.payload_length), tcp.header_len());
            assert_eq!(ip.hop_limit, config.ttl);
            assert_eq!(
                tcp.checksum,
                tcp.calc_checksum_ipv6(ip, &[]).unwrap(),
                "TCP checksum"
            );
        }
        (net, _) => panic!("IP family changed: {net:?}"),
    }
    assert_eq!(tcp.source_port, syn.destination_port);
    assert_eq!(tcp.destination_port, syn.source_port);
    assert!(tcp.syn && tcp.ack && !tcp.fin && !tcp.rst && !tcp.psh && !tcp.urg);
    assert_eq!(tcp.acknowledgment_number, syn.seq.wrapping_add(1));
    assert_ne!(tcp.window_size, 0, "non-zero window");

    let offered = client_options(&syn.options);
    let mut mss = None;
    let mut sack = false;
    let mut window_scale = None;
    let mut timestamp = None;
    for option in tcp.options_iterator() {
        match option.expect("well-formed options") {
            TcpOptionElement::MaximumSegmentSize(value) => mss = Some(value),
            TcpOptionElement::SelectiveAcknowledgementPermitted => sack = true,
            TcpOptionElement::WindowScale(value) => window_scale = Some(value),
            TcpOptionElement::Timestamp(value, echo) => timestamp = Some((value, echo)),
            TcpOptionElement::Noop => {}
            other => panic!("unexpected option {other:?}"),
        }
    }
    if syn.options.is_empty() {
        // Answered without options: the client assumes the family's default MSS (536 for
        // IPv4, RFC 9293 §3.7.1; 1220 for IPv6), which is what the cookie encodes, and the
        // window, unscaled, is the most whole segments of it that fit in 16 bits.
        assert_eq!(
            tcp.options.as_slice(),
            &[] as &[u8],
            "no options for a SYN without"
        );
        assert_eq!(
            tcp.window_size,
            65_535 / expected_mss * expected_mss,
            "a whole number of {expected_mss}-byte segments"
        );
    } else {
        assert_eq!(mss, Some(expected_mss), "MSS from the cookie helper");
    }
    match offered.tsval {
        None => {
            assert_eq!(timestamp, None, "no timestamps unless offered");
            assert!(
                !sack && window_scale.is_none(),
                "without timestamps only MSS survives"
            );
        }
        Some(client_tsval) => {
            let (tsval, echo) = timestamp.expect("timestamps answered");
            assert_eq!(echo, client_tsval, "TSecr echoes the client's TSval");
            let expected_bits = u32::from(offered.window_scale.map_or(0xf, |w| w.min(14)))
                | if offered.sack { 1 << 4 } else { 0 };
            assert_eq!(tsval & 0x3f, expected_bits, "options encoded in TSval");
            let now = monotonic_ms() as u32;
            assert!(
                tsval <= now && now - tsval < 5_000,
                "TSval {tsval} is the kernel's ms clock ({now}), never ahead of it"
            );
            assert_eq!(sack, offered.sack, "SACK-permitted answered iff offered");
            assert_eq!(
                window_scale,
                offered.window_scale.map(|_| config.window_scale),
                "the kernel's window scale for this socket"
            );
        }
    }
    SynAck {
        cookie: tcp.sequence_number,
        tsval: timestamp.map(|(value, _)| value),
    }
}

#[derive(Default)]
struct Offered {
    mss: Option<u16>,
    sack: bool,
    window_scale: Option<u8>,
    tsval: Option<u32>,
}

fn client_options(raw: &[u8]) -> Offered {
    let mut padded = raw.to_vec();
    while !padded.len().is_multiple_of(4) {
        padded.push(0);
    }
    let header = etherparse::TcpHeader {
        options: etherparse::TcpOptions::try_from_slice(&padded).expect("test options"),
        ..Default::default()
    };
    let mut offered = Offered::default();
    for option in header.options_iterator() {
        match option.expect("test options") {
            TcpOptionElement::MaximumSegmentSize(value) => offered.mss = Some(value),
            TcpOptionElement::SelectiveAcknowledgementPermitted => offered.sack = true,
            TcpOptionElement::WindowScale(value) => offered.window_scale = Some(value),
            TcpOptionElement::Timestamp(value, _) => offered.tsval = Some(value),
            _ => {}
        }
    }
    offered
}

/// The client's ACK completing the handshake the SYN-ACK answered.
fn ack_for(syn: &TcpFrame, synack: &SynAck) -> TcpFrame {
    let mut ack = syn.clone().with_flags(ACK);
    ack.seq = syn.seq.wrapping_add(1);
    ack.ack = synack.cookie.wrapping_add(1);
    ack.options = match synack.tsval {
        Some(tsval) => {
            let mut options = vec![1, 1, 8, 10];
            options.extend_from_slice(&(monotonic_ms() as u32).to_be_bytes());
            options.extend_from_slice(&tsval.to_be_bytes());
            options
        }
        None => Vec::new(),
    };
    ack
}

/// SYN → SYN-ACK checked field by field → the ACK built from it passes, and the same ACK with
/// a wrong cookie is dropped.
fn handshake(syn: TcpFrame, expected_mss: u16) {
    in_fresh_netns(move || {
        let (_listener, guard) = listener_and_guard();
        let config = tcpguard::sysctl::syn_cookie_config().unwrap();
        let answer = assert_verdict(&guard, &syn.bytes(), XDP_TX, Counter::SynCookieSent);
        let synack = assert_synack(&syn, &answer, &config, expected_mss);

        let ack = ack_for(&syn, &synack);
        // A cookie off by one can still decode to a valid MSS index (the kernel's cookies keep
        // two bits of data under a 24-bit hash); one with altered hash bits cannot.
        let mut forged = ack.clone();
        forged.ack ^= 0x0055_5500;
        assert_verdict(&guard, &forged.bytes(), XDP_DROP, Counter::CookieRejected);
        assert_verdict(&guard, &ack.bytes(), XDP_PASS, Counter::CookieAccepted);
        // From then on the flow is tracked: its segments pass without a cookie check.
        assert_verdict(&guard, &ack.bytes(), XDP_PASS, Counter::TrackedFlow);
    });
}

/// A tracked segment refreshes its flow's idle time with the kernel's coarse clock
/// (CLOCK_MONOTONIC_COARSE), which the data plane reads once per tick and CPU: the time written
/// lies between the clock read just before and just after the segment, and a segment more than
/// the refresh step (25 ticks: 250 ms at the slowest tick, 100 Hz) later writes a later one. The clock the data plane cached may be
/// one tick older than the one read before it, when its read fell between the kernel's update
/// of `jiffies` and its update of the clock; a tick is at most 10 ms (HZ=100).
#[test]
fn a_tracked_segment_refreshes_its_flow_with_the_coarse_clock() {
    const TICK_NS: u64 = 10_000_000;
    in_fresh_netns(|| {
        let (_listener, mut guard) = listener_and_guard();
        let config = tcpguard::sysctl::syn_cookie_config().unwrap();
        let syn = TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1460, 1, 7));
        let answer = assert_verdict(&guard, &syn.bytes(), XDP_TX, Counter::SynCookieSent);
        let ack = ack_for(&syn, &assert_synack(&syn, &answer, &config, 1460));
        assert_verdict(&guard, &ack.bytes(), XDP_PASS, Counter::CookieAccepted);
        let flows = guard.flows().unwrap();
        let mut last = 0;
        for round in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let before = clock_ns(libc::CLOCK_MONOTONIC_COARSE);
            assert_verdict(&guard, &ack.bytes(), XDP_PASS, Counter::TrackedFlow);
            let after = clock_ns(libc::CLOCK_MONOTONIC_COARSE);
            let seen = flows.get(&syn.flow_key()).expect("the flow").last_seen_ns;
            assert!(
                before.saturating_sub(TICK_NS) <= seen && seen <= after,
                "round {round}: last seen {seen} ns, the coarse clock {before}..{after} ns"
            );
            assert!(
                seen >= last + 100_000_000,
                "round {round}: {seen} after {last}"
            );
            last = seen;
        }
    });
}

/// The interface's MAC lives in each protected port's entry: a new MAC reaches every port
/// protected before the change, and the ports protected after it.
#[test]
fn a_new_interface_mac_reaches_every_protected_port() {
    const NEW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];
    in_fresh_netns(|| {
        // No listener: a SYN that is judged finds none and goes to the kernel.
        let mut guard = xdp::load(&[PORT, PORT + 1]);
        let syn_to = |mac: [u8; 6], port: u16| {
            let mut syn = TcpFrame::syn_v4(port);
            syn.destination_mac = mac;
            syn.bytes()
        };
        for port in [PORT, PORT + 1] {
            assert_verdict(
                &guard,
                &syn_to(SERVER_MAC, port),
                XDP_PASS,
                Counter::NoListener,
            );
            assert_verdict(&guard, &syn_to(NEW_MAC, port), XDP_PASS, Counter::OtherMac);
        }
        guard
            .set_interface_mac(NEW_MAC)
            .expect("writing the new MAC");
        guard
            .set_ports(&[PORT, PORT + 1, PORT + 2].into())
            .expect("protecting a third port");
        for port in [PORT, PORT + 1, PORT + 2] {
            assert_verdict(
                &guard,
                &syn_to(NEW_MAC, port),
                XDP_PASS,
                Counter::NoListener,
            );
            assert_verdict(
                &guard,
                &syn_to(SERVER_MAC, port),
                XDP_PASS,
                Counter::OtherMac,
            );
        }
    });
}

#[test]
fn ipv4_syn_with_linux_options() {
    handshake(
        TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1460, 0xdead_beef, 7)),
        1460,
    );
}

/// A SYN without options is answered in a frame of the same size: no tailroom needed.
#[test]
fn ipv4_syn_without_options() {
    handshake(TcpFrame::syn_v4(PORT), 536);
}

#[test]
fn ipv4_syn_with_macos_options_and_large_window_scale() {
    handshake(
        TcpFrame::syn_v4(PORT).with_options(macos_syn_options(1440, 77, 15)),
        1440,
    );
}

#[test]
fn ipv4_syn_with_windows_options() {
    handshake(
        TcpFrame::syn_v4(PORT).with_options(windows_syn_options(1460, 8)),
        1460,
    );
}

/// Linux's layout is read at fixed offsets; a scale above 14 is clamped there as in the walk.
#[test]
fn ipv4_syn_with_linux_options_and_large_window_scale() {
    handshake(
        TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1460, 3, 15)),
        1460,
    );
}

/// Linux's layout but for one byte (end-of-list where the NOP before the window scale goes):
/// not the fixed layout, so the walk reads it, and stops there, without a window scale.
#[test]
fn ipv4_syn_almost_in_linux_layout() {
    let mut options = linux_syn_options(1460, 3, 7);
    options[16] = 0;
    handshake(TcpFrame::syn_v4(PORT).with_options(options), 1460);
}

#[test]
fn ipv4_syn_with_timestamps_only() {
    let mut options = vec![2, 4, 0x05, 0x14, 1, 1, 8, 10];
    options.extend_from_slice(&[0, 0, 0, 9, 0, 0, 0, 0]);
    handshake(TcpFrame::syn_v4(PORT).with_options(options), 1300);
}

/// An MSS between the kernel's table entries is rounded down to the one below it.
#[test]
fn ipv4_syn_mss_rounds_down_to_the_kernels_table() {
    handshake(
        TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1400, 11, 7)),
        1300,
    );
}

#[test]
fn ipv6_syn_mss_rounds_down_to_the_kernels_table() {
    handshake(
        TcpFrame::syn_v6(PORT).with_options(linux_syn_options(9000, 11, 7)),
        8940,
    );
    handshake(
        TcpFrame::syn_v6(PORT).with_options(windows_syn_options(1400, 2)),
        1220,
    );
}

#[test]
fn ipv4_syn_with_ip_options() {
    let mut syn = TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1460, 5, 9));
    // Record Route (7) with room for two addresses, padded with NOP and EOL.
    syn.ip = Ip::V4 {
        source: CLIENT_V4,
        destination: SERVER_V4,
        options: vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    };
    handshake(syn, 1460);
}

#[test]
fn ipv4_syn_behind_one_vlan_tag() {
    let mut syn = TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1460, 1, 7));
    syn.vlans = vec![(TPID_8021Q, 100)];
    handshake(syn, 1460);
}

#[test]
fn ipv4_syn_behind_two_vlan_tags() {
    let mut syn = TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1460, 1, 7));
    syn.vlans = vec![(TPID_8021AD, 200), (TPID_8021Q, 100)];
    handshake(syn, 1460);
}

#[test]
fn ipv6_syn_with_linux_options() {
    handshake(
        TcpFrame::syn_v6(PORT).with_options(linux_syn_options(1440, 42, 7)),
        1440,
    );
}

#[test]
fn ipv6_syn_without_options() {
    handshake(TcpFrame::syn_v6(PORT), 1220);
}

#[test]
fn ipv6_syn_behind_extension_headers() {
    let mut syn = TcpFrame::syn_v6(PORT).with_options(linux_syn_options(1440, 42, 7));
    syn.ip = Ip::V6 {
        source: CLIENT_V6,
        destination: SERVER_V6,
        extensions: vec![
            (IPV6_HOP_BY_HOP, 0),
            (IPV6_ROUTING, 1),
            (IPV6_DESTINATION, 2),
        ],
    };
    syn.vlans = vec![(TPID_8021Q, 7)];
    handshake(syn, 1440);
}

#[test]
fn syn_to_a_protected_port_without_listener_goes_to_the_kernel() {
    in_fresh_netns(|| {
        let guard = xdp::load(&[PORT]);
        let syn = TcpFrame::syn_v4(PORT).bytes();
        let out = assert_verdict(&guard, &syn, XDP_PASS, Counter::NoListener);
        assert_eq!(out, syn);
    });
}

#[test]
fn fin_rst_and_ack_without_a_connection_are_dropped() {
    in_fresh_netns(|| {
        let (_listener, guard) = listener_and_guard();
        for flags in [RST, RST | ACK] {
            let frame = TcpFrame::syn_v4(PORT).with_flags(flags).bytes();
            assert_verdict(&guard, &frame, XDP_DROP, Counter::NoConnection);
        }
        // To a listener, an ACK must return a cookie, with or without a FIN (which completes a
        // handshake whose pure ACK was lost).
        for flags in [ACK, FIN | ACK] {
            let mut ack = TcpFrame::syn_v6(PORT).with_flags(flags);
            ack.ack = 12345;
            assert_verdict(&guard, &ack.bytes(), XDP_DROP, Counter::CookieRejected);
        }
        let guard_without_listener = xdp::load(&[PORT + 1]);
        for flags in [ACK, FIN | ACK] {
            let ack = TcpFrame::syn_v4(PORT + 1).with_flags(flags).bytes();
            assert_verdict(
                &guard_without_listener,
                &ack,
                XDP_DROP,
                Counter::NoConnection,
            );
        }
    });
}

#[test]
fn unprotected_traffic_passes_unchanged() {
    in_fresh_netns(|| {
        let (_listener, guard) = listener_and_guard();
        let mut udp = TcpFrame::syn_v4(PORT).bytes();
        udp[14 + 9] = 17;
        let mut arp = TcpFrame::syn_v4(PORT).bytes();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        let cases = [
            (
                TcpFrame::syn_v4(UNPROTECTED_PORT).bytes(),
                Counter::Unprotected,
            ),
            (
                TcpFrame::syn_v6(UNPROTECTED_PORT).bytes(),
                Counter::Unprotected,
            ),
            (
                TcpFrame::syn_v4(UNPROTECTED_PORT).with_flags(0).bytes(),
                Counter::Unprotected,
            ),
            (udp, Counter::NotTcp),
            (arp, Counter::NotIp),
        ];
        for (frame, counter) in cases {
            let out = assert_verdict(&guard, &frame, XDP_PASS, counter);
            assert_eq!(out, frame, "{counter:?} passes byte for byte");
        }
    });
}

/// A plain frame (untagged; IPv4 without options, IPv6 without extension headers) has its port
/// read before anything else: to an unprotected port it passes as it is, faults and all, since
/// the kernel judges those as without tcpguard; to a protected one it is dissected whole, and
/// faults are dropped (`malformed_headers_are_dropped_with_their_reason`). Any other frame is
/// dissected up to its port first, so a fault found on the way is dropped whatever the port.
#[test]
fn a_plain_frame_to_an_unprotected_port_passes_on_its_port_alone() {
    in_fresh_netns(|| {
        let (_listener, guard) = listener_and_guard();
        let v4 = TcpFrame::syn_v4(UNPROTECTED_PORT);
        let v6 = TcpFrame::syn_v6(UNPROTECTED_PORT);
        // The IP length fields, and a value of each one past the end of the frame.
        let v4_length = (16..18, (v4.bytes().len() - 14 + 1) as u16);
        let v6_length = (18..20, (v6.bytes().len() - 54 + 1) as u16);
        let with_length = |frame: &TcpFrame, (field, length): (std::ops::Range<usize>, u16)| {
            let mut frame = frame.bytes();
            frame[field].copy_from_slice(&length.to_be_bytes());
            frame
        };
        let mut first_fragment = v4.clone();
        first_fragment.more_fragments = true;
        let passed = [
            (
                "IPv4 total length past the frame",
                with_length(&v4, v4_length.clone()),
            ),
            (
                "IPv4 total length below IHL",
                with_length(&v4, (16..18, 19)),
            ),
            (
                "IPv4 frame cut inside the TCP header",
                v4.bytes()[..14 + 20 + 4].to_vec(),
            ),
            ("IPv4 first fragment", first_fragment.bytes()),
            (
                "IPv6 payload length past the frame",
                with_length(&v6, v6_length.clone()),
            ),
            (
                "IPv6 frame cut inside the TCP header",
                v6.bytes()[..14 + 40 + 4].to_vec(),
            ),
        ];
        for (what, frame) in passed {
            let out = assert_verdict(&guard, &frame, XDP_PASS, Counter::Unprotected);
            assert_eq!(out, frame, "{what}: passes byte for byte");
        }

        let mut later_fragment = v4.clone();
        later_fragment.fragment_offset = 3;
        assert_verdict(
            &guard,
            &later_fragment.bytes(),
            XDP_PASS,
            Counter::LaterFragment,
        );
        // Not plain: dissected up to the port, whose faults on the way are dropped.
        let mut with_options = v4.clone();
        with_options.ip = Ip::V4 {
            source: CLIENT_V4,
            destination: SERVER_V4,
            options: vec![1, 1, 1, 1],
        };
        let mut tagged = v4.clone();
        tagged.vlans = vec![(TPID_8021Q, 100)];
        let mut extended = v6.clone();
        extended.ip = Ip::V6 {
            source: CLIENT_V6,
            destination: SERVER_V6,
            extensions: vec![(IPV6_DESTINATION, 0)],
        };
        for frame in [with_options, tagged.clone(), extended.clone()] {
            assert_verdict(&guard, &frame.bytes(), XDP_PASS, Counter::Unprotected);
        }
        let mut tagged_fault = tagged.bytes();
        tagged_fault[20..22].copy_from_slice(&v4_length.1.to_be_bytes());
        assert_verdict(&guard, &tagged_fault, XDP_DROP, Counter::BadIpTotalLength);
        let mut extended_fault = extended.bytes();
        extended_fault[18..20].copy_from_slice(&(v6_length.1 + 8).to_be_bytes());
        assert_verdict(&guard, &extended_fault, XDP_DROP, Counter::BadIpTotalLength);
    });
}

#[test]
fn invalid_flag_combinations_are_dropped_with_their_reason() {
    in_fresh_netns(|| {
        let (_listener, guard) = listener_and_guard();
        let cases = [
            (0, Counter::NullFlags),
            (PSH, Counter::NullFlags),
            (FIN | PSH | URG, Counter::XmasFlags),
            (SYN | FIN, Counter::SynFin),
            (SYN | FIN | ACK, Counter::SynFin),
            (SYN | RST, Counter::SynRst),
            (FIN, Counter::FinWithoutAck),
            (FIN | PSH, Counter::FinWithoutAck),
            (URG, Counter::BadFlags),
            (RST | FIN | ACK, Counter::BadFlags),
            (FIN | SYN | RST | PSH | ACK | URG, Counter::SynFin),
        ];
        for family in [TcpFrame::syn_v4(PORT), TcpFrame::syn_v6(PORT)] {
            for (flags, counter) in cases {
                let frame = family.clone().with_flags(flags).bytes();
                assert_verdict(&guard, &frame, XDP_DROP, counter);
            }
        }
    });
}

#[test]
fn malformed_headers_are_dropped_with_their_reason() {
    in_fresh_netns(|| {
        let (_listener, guard) = listener_and_guard();
        let syn = TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1460, 1, 7));
        let good = syn.bytes();
        let mut cases: Vec<(&str, Vec<u8>, Counter)> = vec![
            // BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet header.
            (
                "VLAN tag cut short",
                {
                    let mut tagged = good[..12].to_vec();
                    tagged.extend_from_slice(&[0x81, 0x00, 0x00]);
                    tagged
                },
                Counter::Truncated,
            ),
            (
                "IPv4 header cut short",
                good[..14 + 19].to_vec(),
                Counter::Truncated,
            ),
            (
                "frame cut inside the TCP header",
                good[..14 + 20 + 19].to_vec(),
                Counter::BadIpTotalLength,
            ),
        ];
        let mut ihl = good.clone();
        ihl[14] = 0x44;
        cases.push(("IHL 4", ihl, Counter::BadIpHeaderLength));
        let mut version = good.clone();
        version[14] = 0x65;
        cases.push((
            "version 6 in an IPv4 EtherType",
            version,
            Counter::BadIpVersion,
        ));
        let mut total = good.clone();
        total[16..18].copy_from_slice(&((good.len() - 14 + 1) as u16).to_be_bytes());
        cases.push((
            "total length past the frame",
            total,
            Counter::BadIpTotalLength,
        ));
        let mut short_total = good.clone();
        short_total[16..18].copy_from_slice(&19u16.to_be_bytes());
        cases.push((
            "total length below IHL",
            short_total,
            Counter::BadIpTotalLength,
        ));
        let mut tcp_in_ip = good.clone();
        tcp_in_ip[16..18].copy_from_slice(&(20u16 + 12).to_be_bytes());
        cases.push(("TCP header beyond IP length", tcp_in_ip, Counter::Truncated));
        let mut low_offset = syn.clone();
        low_offset.data_offset = Some(4);
        cases.push(("data offset 4", low_offset.bytes(), Counter::BadDataOffset));
        let mut high_offset = syn.clone();
        high_offset.data_offset = Some(15);
        cases.push((
            "data offset past the segment",
            high_offset.bytes(),
            Counter::BadDataOffset,
        ));
        let mut first_fragment = syn.clone();
        first_fragment.more_fragments = true;
        cases.push(("first fragment", first_fragment.bytes(), Counter::Fragment));
        let mut v6_fragment = TcpFrame::syn_v6(PORT);
        v6_fragment.more_fragments = true;
        v6_fragment.ip = Ip::V6 {
            source: CLIENT_V6,
            destination: SERVER_V6,
            extensions: vec![(IPV6_FRAGMENT, 0)],
        };
        cases.push((
            "IPv6 first fragment",
            v6_fragment.bytes(),
            Counter::Fragment,
        ));
        let mut v6_length = TcpFrame::syn_v6(PORT).bytes();
        v6_length[18..20].copy_from_slice(&1000u16.to_be_bytes());
        cases.push((
            "IPv6 payload length past the frame",
            v6_length,
            Counter::BadIpTotalLength,
        ));
        for (what, frame, counter) in cases {
            let (outcome, moved) = xdp::run_counted(&guard, &frame);
            assert_eq!(outcome.action, XDP_DROP, "{what}");
            assert_eq!(
                moved.nonzero().collect::<Vec<_>>(),
                vec![(counter, 1)],
                "{what}"
            );
        }
    });
}

#[test]
fn later_fragments_pass_because_they_carry_no_tcp_header() {
    in_fresh_netns(|| {
        let (_listener, guard) = listener_and_guard();
        let mut later = TcpFrame::syn_v4(PORT);
        later.fragment_offset = 3;
        let frame = later.bytes();
        let out = assert_verdict(&guard, &frame, XDP_PASS, Counter::LaterFragment);
        assert_eq!(out, frame);
    });
}

#[test]
fn an_unfragmented_ipv4_packet_without_df_is_legitimate() {
    in_fresh_netns(|| {
        let (_listener, guard) = listener_and_guard();
        let syn = TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1460, 3, 7));
        let mut frame = syn.bytes();
        frame[14 + 6] = 0; // clear DF
        refresh_ipv4_checksum(&mut frame, 14);
        let answer = assert_verdict(&guard, &frame, XDP_TX, Counter::SynCookieSent);
        let config = tcpguard::sysctl::syn_cookie_config().unwrap();
        assert_synack(&syn, &answer, &config, 1460);
    });
}

/// Runs `frame` and asserts that it went to the kernel exactly as it came, under `counter`.
fn assert_untouched(guard: &Guard, what: &str, frame: &[u8], counter: Counter) {
    let (outcome, moved) = xdp::run_counted(guard, frame);
    assert_eq!(outcome.action, XDP_PASS, "{what}: passed to the kernel");
    assert_eq!(outcome.frame, frame, "{what}: not rewritten");
    assert_eq!(
        moved.nonzero().collect::<Vec<_>>(),
        vec![(counter, 1)],
        "{what}: counted once, under its reason"
    );
}

fn syn_between(source: &str, destination: &str) -> TcpFrame {
    let mut syn = TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1460, 3, 7));
    syn.ip = match (source.parse().unwrap(), destination.parse().unwrap()) {
        (std::net::IpAddr::V4(source), std::net::IpAddr::V4(destination)) => Ip::V4 {
            source,
            destination,
            options: Vec::new(),
        },
        (std::net::IpAddr::V6(source), std::net::IpAddr::V6(destination)) => Ip::V6 {
            source,
            destination,
            extensions: Vec::new(),
        },
        _ => panic!("one family"),
    };
    syn
}

#[test]
fn syns_the_host_would_not_take_as_its_own_go_to_the_kernel_untouched() {
    in_fresh_netns(|| {
        let (_listener, guard) = listener_and_guard();
        let mut cases: Vec<(&str, Vec<u8>, Counter)> = Vec::new();
        // Forwarded traffic: the host owns neither address (a router, a container host).
        for (what, source, destination) in [
            ("an address the host does not own", "10.99.0.1", "10.99.0.3"),
            (
                "an IPv6 address the host does not own",
                "fd00:99::1",
                "fd00:99::3",
            ),
            ("a directed broadcast", "10.99.0.1", "10.99.0.255"),
        ] {
            cases.push((
                what,
                syn_between(source, destination).bytes(),
                Counter::NotHostAddress,
            ));
        }
        for (what, source, destination) in [
            ("from loopback", "127.0.0.1", "10.99.0.2"),
            ("to loopback", "10.99.0.1", "127.0.0.1"),
            ("to multicast", "10.99.0.1", "224.0.0.1"),
            ("to the limited broadcast", "10.99.0.1", "255.255.255.255"),
            ("from the unspecified address", "0.0.0.0", "10.99.0.2"),
            ("from multicast", "239.1.2.3", "10.99.0.2"),
            ("from the host's own address", "10.99.0.2", "10.99.0.2"),
            ("from IPv6 loopback", "::1", "fd00:99::2"),
            ("to IPv6 multicast", "fd00:99::1", "ff02::1"),
            (
                "from an IPv4-mapped address",
                "::ffff:10.99.0.1",
                "fd00:99::2",
            ),
            ("from the IPv6 unspecified address", "::", "fd00:99::2"),
        ] {
            cases.push((
                what,
                syn_between(source, destination).bytes(),
                Counter::MartianAddress,
            ));
        }
        for (what, mac) in [
            ("another host's MAC", [0x02, 0, 0, 0, 0, 0x03]),
            ("the broadcast MAC", [0xff; 6]),
            ("a multicast MAC", [0x01, 0, 0x5e, 0, 0, 0x01]),
        ] {
            let mut syn = TcpFrame::syn_v4(PORT);
            syn.destination_mac = mac;
            cases.push((what, syn.bytes(), Counter::OtherMac));
        }
        let mut bad_tcp = TcpFrame::syn_v4(PORT)
            .with_options(linux_syn_options(1460, 3, 7))
            .bytes();
        let last = bad_tcp.len() - 1;
        bad_tcp[last] ^= 0x01; // an option byte: the TCP checksum no longer matches
        cases.push(("a bad TCP checksum", bad_tcp, Counter::BadChecksum));
        let mut bad_ip = TcpFrame::syn_v4(PORT).bytes();
        bad_ip[14 + 8] = 63; // TTL, without updating the header checksum
        cases.push(("a bad IPv4 header checksum", bad_ip, Counter::BadChecksum));
        let mut bad_v6_tcp = TcpFrame::syn_v6(PORT).bytes();
        let at = 14 + 40 + 16; // the TCP checksum field
        bad_v6_tcp[at] ^= 0x80;
        cases.push((
            "a bad TCP checksum over IPv6",
            bad_v6_tcp,
            Counter::BadChecksum,
        ));
        let mut data = TcpFrame::syn_v4(PORT);
        data.payload = b"fast open data".to_vec();
        let mut bad_data = data.bytes();
        let last = bad_data.len() - 1;
        bad_data[last] ^= 0x20;
        cases.push((
            "a bad checksum over SYN data",
            bad_data,
            Counter::BadChecksum,
        ));
        for (what, options, counter) in [
            // Loose source route: type 131, length 7, pointer 4, one hop; then EOL.
            (
                "an IPv4 loose source route",
                vec![131, 7, 4, 10, 99, 0, 9, 0],
                Counter::SourceRouted,
            ),
            (
                "an IPv4 strict source route",
                vec![137, 7, 4, 10, 99, 0, 9, 0],
                Counter::SourceRouted,
            ),
            (
                "an IPv4 option of length 1",
                vec![7, 1, 0, 0],
                Counter::BadIpOptions,
            ),
            (
                "an IPv4 option past the header",
                vec![1, 68, 12, 5],
                Counter::BadIpOptions,
            ),
        ] {
            let mut syn = TcpFrame::syn_v4(PORT);
            syn.ip = Ip::V4 {
                source: CLIENT_V4,
                destination: SERVER_V4,
                options,
            };
            cases.push((what, syn.bytes(), counter));
        }
        let mut routed = TcpFrame::syn_v6(PORT);
        routed.ip = Ip::V6 {
            source: CLIENT_V6,
            destination: SERVER_V6,
            extensions: vec![(IPV6_ROUTING, 0)],
        };
        let mut routed = routed.bytes();
        routed[14 + 40 + 3] = 1; // segments left
        cases.push((
            "an IPv6 routing header with segments left",
            routed,
            Counter::SourceRouted,
        ));
        let mut long_chain = TcpFrame::syn_v6(PORT);
        long_chain.ip = Ip::V6 {
            source: CLIENT_V6,
            destination: SERVER_V6,
            extensions: vec![(IPV6_DESTINATION, 0); 7],
        };
        cases.push((
            "seven IPv6 extension headers (the kernel accepts them; the port is not known)",
            long_chain.bytes(),
            Counter::ExtensionHeaderChain,
        ));
        for (what, frame, counter) in cases {
            assert_untouched(&guard, what, &frame, counter);
        }
    });
}

#[test]
fn syns_the_host_takes_as_its_own_are_answered() {
    in_fresh_netns(|| {
        let (_listener, guard) = listener_and_guard();
        let mut data = TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1460, 3, 7));
        data.payload = vec![0x5a; 1001]; // an odd length: the checksum pads it
        assert_verdict(&guard, &data.bytes(), XDP_TX, Counter::SynCookieSent);
        let mut record_route = TcpFrame::syn_v4(PORT);
        record_route.ip = Ip::V4 {
            source: CLIENT_V4,
            destination: SERVER_V4,
            options: vec![7, 7, 4, 0, 0, 0, 0, 1], // record route with room for one hop, NOP
        };
        assert_verdict(
            &guard,
            &record_route.bytes(),
            XDP_TX,
            Counter::SynCookieSent,
        );
        let mut spent_route = TcpFrame::syn_v6(PORT);
        spent_route.ip = Ip::V6 {
            source: CLIENT_V6,
            destination: SERVER_V6,
            extensions: vec![(IPV6_ROUTING, 0)],
        };
        // A routing header with no segments left: this host is the final destination.
        assert_verdict(&guard, &spent_route.bytes(), XDP_TX, Counter::SynCookieSent);
    });
}

#[test]
fn a_chain_of_ipv6_fragment_headers_is_a_fragment() {
    in_fresh_netns(|| {
        let (_listener, guard) = listener_and_guard();
        let mut chained = TcpFrame::syn_v6(PORT);
        chained.ip = Ip::V6 {
            source: CLIENT_V6,
            destination: SERVER_V6,
            extensions: vec![(IPV6_FRAGMENT, 0), (IPV6_FRAGMENT, 0)],
        };
        let mut frame = chained.bytes();
        // The first Fragment header says more fragments follow; the second says none do.
        frame[14 + 40 + 3] |= 1;
        frame[14 + 40 + 8 + 3] &= !1;
        assert_verdict(&guard, &frame, XDP_DROP, Counter::Fragment);
    });
}

/// A known key, written as the daemon writes its keys.
const OWN_SECRETS: CookieSecrets = CookieSecrets {
    keys: [[0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908], [0; 2]],
    generation: 2,
    previous_until_s: 0,
};

/// tcpguard in own-cookie mode with [`OWN_SECRETS`], as the daemon configures it.
fn own_listener_and_guard() -> (TcpListener, Guard, SynCookieConfig) {
    let listener = TcpListener::bind(("::", PORT)).expect("listening on [::]:8080");
    let mut guard = xdp::load_for(&[PORT], true);
    let config = SynCookieConfig {
        mss: 1460,
        ..tcpguard::sysctl::syn_cookie_config().unwrap()
    };
    guard.set_syn_cookie_config(config).unwrap();
    guard.set_cookie_secrets(&OWN_SECRETS).unwrap();
    (listener, guard, config)
}

/// What an own-cookie SYN-ACK carried.
#[derive(Debug, PartialEq)]
struct OwnSynAck {
    isn: u32,
    mss: Option<u16>,
    window_scale: Option<u8>,
    sack: bool,
    timestamp: Option<(u32, u32)>,
    ece: bool,
}

fn own_synack(answer: &[u8]) -> OwnSynAck {
    let headers = PacketHeaders::from_ethernet_slice(answer).expect("etherparse parses it");
    let Some(TransportHeader::Tcp(tcp)) = &headers.transport else {
        panic!("a TCP segment");
    };
    let mut seen = OwnSynAck {
        isn: tcp.sequence_number,
        mss: None,
        window_scale: None,
        sack: false,
        timestamp: None,
        ece: tcp.ece,
    };
    for option in tcp.options_iterator() {
        match option.expect("well-formed options") {
            TcpOptionElement::MaximumSegmentSize(value) => seen.mss = Some(value),
            TcpOptionElement::SelectiveAcknowledgementPermitted => seen.sack = true,
            TcpOptionElement::WindowScale(value) => seen.window_scale = Some(value),
            TcpOptionElement::Timestamp(value, echo) => seen.timestamp = Some((value, echo)),
            TcpOptionElement::Noop => {}
            other => panic!("unexpected option {other:?}"),
        }
    }
    seen
}

/// A real connection over lo from the client of `syn`, address and port, to the server: the
/// socket the kernel would have built from the handshake's ACK.
fn connect_as(syn: &TcpFrame) -> std::net::TcpStream {
    let (client, server) = match &syn.ip {
        Ip::V4 {
            source,
            destination,
            ..
        } => (IpAddr::from(*source), IpAddr::from(*destination)),
        Ip::V6 {
            source,
            destination,
            ..
        } => (IpAddr::from(*source), IpAddr::from(*destination)),
    };
    let (family, prefix) = if client.is_ipv4() {
        ("-4", 32)
    } else {
        ("-6", 128)
    };
    let address = format!("{client}/{prefix}");
    let mut add = vec![family, "addr", "replace", &address, "dev", "lo"];
    if client.is_ipv6() {
        add.push("nodad");
    }
    tcpguard_tests::netns::run("ip", &add);
    tcpguard_tests::rig::connect_from(
        SocketAddr::new(client, syn.source_port),
        SocketAddr::new(server, PORT),
    )
    .expect("connecting over lo as the frame's client")
}

/// An own-cookie handshake: the SYN-ACK offers exactly `expected` options, the host's build of
/// the cookie code accepts its ISN with them, the ACK built from it is accepted in XDP, and
/// forged ACKs are dropped under their reasons.
fn own_handshake(syn: TcpFrame, expected: CookieOptions, ece: bool) {
    in_fresh_netns(move || {
        let (_listener, guard, config) = own_listener_and_guard();
        let answer = assert_verdict(&guard, &syn.bytes(), XDP_TX, Counter::SynCookieSent);
        let seen = own_synack(&answer);
        let key = syn.flow_key();
        let offered = client_options(&syn.options);
        let v6 = matches!(syn.ip, Ip::V6 { .. });
        assert_eq!(
            seen.mss,
            Some(if v6 { 1440 } else { 1460 }),
            "the interface's MSS"
        );
        assert_eq!(seen.sack, expected.sack, "SACK-permitted");
        assert_eq!(
            seen.window_scale,
            (expected.window_scale != cookie::WSCALE_NONE).then_some(config.window_scale),
            "the server's own window scale, without timestamps too"
        );
        assert_eq!(seen.ece, ece, "ECN answered iff asked for");
        assert_eq!(
            seen.timestamp.map(|(_, echo)| echo),
            offered.tsval,
            "timestamps answered iff offered, echoing the client's"
        );
        let tsval = seen.timestamp.map(|(tsval, _)| tsval);
        let decoded = cookie::check(
            &OWN_SECRETS,
            tcpguard::cookies::tai_now_s(),
            &key,
            syn.seq.wrapping_add(1),
            seen.isn.wrapping_add(1),
            tsval.is_some(),
            tsval.unwrap_or(0),
        )
        .expect("the host's cookie code accepts what XDP made");
        assert_eq!(decoded, expected, "the options the cookie carries");

        let ack = ack_for(
            &syn,
            &SynAck {
                cookie: seen.isn,
                tsval,
            },
        );
        let mut forged = ack.clone();
        forged.ack ^= 0x0055_5500;
        assert_verdict(&guard, &forged.bytes(), XDP_DROP, Counter::CookieRejected);
        if let Some(tsval) = tsval {
            let mut bad_echo = ack.clone();
            bad_echo.options[8..12].copy_from_slice(&(tsval ^ 1).to_be_bytes());
            assert_verdict(
                &guard,
                &bad_echo.bytes(),
                XDP_DROP,
                Counter::CookieBadTimestamp,
            );
        }
        assert_verdict(&guard, &ack.bytes(), XDP_PASS, Counter::CookieAccepted);
        // A test run reaches no TCP stack: the kernel built no socket from the ACK, so the
        // flow awaits one, and each segment must return the cookie again.
        assert_verdict(&guard, &forged.bytes(), XDP_DROP, Counter::CookieRejected);
        assert_verdict(&guard, &ack.bytes(), XDP_PASS, Counter::CookieAccepted);
        // Once the kernel has a socket for the 4-tuple (here a real connection over lo), the
        // flow is tracked: its segments go to that socket without a cookie check.
        let _connection = connect_as(&syn);
        assert_verdict(&guard, &forged.bytes(), XDP_PASS, Counter::TrackedFlow);
        assert_verdict(&guard, &ack.bytes(), XDP_PASS, Counter::TrackedFlow);
    });
}

/// Windows' default SYN: MSS, window scale and SACK-permitted, no timestamps.
fn windows_syn_options(mss: u16, window_scale: u8) -> Vec<u8> {
    let mut options = vec![2, 4];
    options.extend_from_slice(&mss.to_be_bytes());
    options.extend_from_slice(&[1, 3, 3, window_scale, 1, 1, 4, 2]);
    options
}

fn expected(
    mss_index: u8,
    window_scale: u8,
    sack: bool,
    ecn: bool,
    timestamps: bool,
) -> CookieOptions {
    CookieOptions {
        mss_index,
        window_scale,
        sack,
        ecn,
        timestamps,
    }
}

#[test]
fn own_cookies_keep_window_scale_and_sack_without_timestamps() {
    own_handshake(
        TcpFrame::syn_v4(PORT).with_options(windows_syn_options(1460, 8)),
        expected(7, 8, true, false, false),
        false,
    );
}

#[test]
fn own_cookies_carry_timestamps_and_the_mss_table() {
    own_handshake(
        TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1400, 0xdead_beef, 7)),
        expected(4, 7, true, false, true),
        false,
    );
}

#[test]
fn own_cookies_answer_ecn_when_asked() {
    own_handshake(
        TcpFrame::syn_v4(PORT)
            .with_options(linux_syn_options(1460, 5, 7))
            .with_flags(SYN | ECE | CWR),
        expected(7, 7, true, true, true),
        true,
    );
}

#[test]
fn own_cookies_over_ipv6_without_sack() {
    let mut options = windows_syn_options(1440, 2);
    options[10..12].copy_from_slice(&[1, 1]); // SACK-permitted replaced by NOPs
    own_handshake(
        TcpFrame::syn_v6(PORT).with_options(options),
        expected(7, 2, false, false, false),
        false,
    );
}

/// One million ACKs with random ports, sequence and acknowledgment numbers at a protected port
/// with a listener: each is checked as an own cookie, and they pass no more often than the
/// documented forgery probability, 2^-21 per ACK (0.48 expected here).
#[test]
fn a_million_random_acks_pass_no_more_often_than_the_forgery_bound() {
    in_fresh_netns(|| {
        let (_listener, guard, _) = own_listener_and_guard();
        let mut frame = TcpFrame::syn_v4(PORT).with_flags(ACK).bytes();
        let tcp = 14 + 20;
        let mut state = tcpguard::cookies::tai_now_s() | 1;
        eprintln!("random ACKs from seed {state:#x}");
        let mut next = || {
            // xorshift64: fast, and good enough to spread ACKs over the cookie space.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        const ACKS: u64 = 1_000_000;
        let before = guard.counters().unwrap();
        for _ in 0..ACKS {
            let (a, b) = (next(), next());
            frame[tcp..tcp + 2].copy_from_slice(&(1024 + (a as u16 % 60_000)).to_be_bytes());
            frame[tcp + 4..tcp + 8].copy_from_slice(&((a >> 32) as u32).to_be_bytes());
            frame[tcp + 8..tcp + 12].copy_from_slice(&(b as u32).to_be_bytes());
            xdp::run(&guard, &frame);
        }
        let moved = guard.counters().unwrap().since(&before);
        let accepted = moved.get(Counter::CookieAccepted);
        // A forged ACK naming the retired key's slot can match its hash too; it is refused all
        // the same, under its own reason.
        let rejected = moved.get(Counter::CookieRejected) + moved.get(Counter::CookieRetiredKey);
        // Once one is accepted, later ACKs that happen to share its 4-tuple are that tracked
        // connection's.
        let tracked = moved.get(Counter::TrackedFlow);
        eprintln!(
            "{ACKS} random ACKs: {accepted} accepted, {rejected} rejected, {tracked} on an accepted one's 4-tuple"
        );
        assert_eq!(
            accepted + rejected + tracked,
            ACKS,
            "every ACK was checked as a cookie: {:?}",
            moved.nonzero().collect::<Vec<_>>()
        );
        // Poisson with mean 0.48: more than 5 has a probability below 2·10^-5.
        assert!(
            accepted <= 5,
            "{accepted} forged ACKs accepted, expected about 0.48"
        );
    });
}

/// After one key rotation a cookie from the previous key still opens its connection; after
/// two, its key is gone and the ACK is dropped.
#[test]
fn own_cookies_survive_one_key_rotation_and_not_two() {
    in_fresh_netns(|| {
        let (_listener, mut guard, _) = own_listener_and_guard();
        let now = tcpguard::cookies::tai_now_s();
        let mut synacks = Vec::new();
        for port in [41_000, 41_001] {
            let mut syn = TcpFrame::syn_v4(PORT).with_options(windows_syn_options(1460, 7));
            syn.source_port = port;
            let answer = assert_verdict(&guard, &syn.bytes(), XDP_TX, Counter::SynCookieSent);
            let cookie = own_synack(&answer).isn;
            synacks.push(ack_for(
                &syn,
                &SynAck {
                    cookie,
                    tsval: None,
                },
            ));
        }
        let mut secrets = OWN_SECRETS;
        secrets.rotate([11, 12], now + cookie::COOKIE_LIFETIME_S);
        guard.set_cookie_secrets(&secrets).unwrap();
        assert_verdict(
            &guard,
            &synacks[0].bytes(),
            XDP_PASS,
            Counter::CookieAccepted,
        );
        secrets.rotate([13, 14], now + cookie::COOKIE_LIFETIME_S);
        guard.set_cookie_secrets(&secrets).unwrap();
        assert_verdict(
            &guard,
            &synacks[1].bytes(),
            XDP_DROP,
            Counter::CookieRejected,
        );
        // A retired previous key: its grace is over.
        let mut retired = OWN_SECRETS;
        retired.rotate([11, 12], now.saturating_sub(1));
        guard.set_cookie_secrets(&retired).unwrap();
        assert_verdict(
            &guard,
            &synacks[1].bytes(),
            XDP_DROP,
            Counter::CookieRetiredKey,
        );
    });
}

#[test]
fn own_cookies_behind_two_vlan_tags() {
    let mut syn = TcpFrame::syn_v4(PORT).with_options(windows_syn_options(1460, 7));
    syn.vlans = vec![(TPID_8021AD, 10), (TPID_8021Q, 20)];
    own_handshake(syn, expected(7, 7, true, false, false), false);
}

/// A new handshake on the 4-tuple of a tracked connection the kernel no longer has (its
/// TIME-WAIT over, the client reusing its port): the SYN answered with a cookie forgets the old
/// flow, so the new ACK is checked as a cookie and handed over, not passed as a tracked segment
/// the kernel would answer with a RST.
#[test]
fn a_reused_4_tuple_starts_afresh() {
    in_fresh_netns(|| {
        let (_listener, guard, _) = own_listener_and_guard();
        for (attempt, isn) in [(1, 0x1111_0000u32), (2, 0x2222_0000)] {
            let mut syn = TcpFrame::syn_v4(PORT).with_options(windows_syn_options(1460, 7));
            syn.seq = isn;
            let answer = assert_verdict(&guard, &syn.bytes(), XDP_TX, Counter::SynCookieSent);
            let cookie = own_synack(&answer).isn;
            let ack = ack_for(
                &syn,
                &SynAck {
                    cookie,
                    tsval: None,
                },
            );
            let (outcome, moved) = xdp::run_counted(&guard, &ack.bytes());
            assert_eq!(
                (outcome.action, moved.nonzero().collect::<Vec<_>>()),
                (XDP_PASS, vec![(Counter::CookieAccepted, 1)]),
                "handshake {attempt} on the same 4-tuple"
            );
        }
    });
}
