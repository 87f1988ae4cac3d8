//! The benchmarks' floor programs, run by the kernel (BPF_PROG_TEST_RUN): each does the work its
//! figures stand for and no less, so that a floor cannot look cheap by doing nothing. The
//! SYN-ACK floors (`tcpguard-ebpf/src/bin/xdp_synack_floor.rs`) answer with a well-formed
//! SYN-ACK, the one with the lookup only for a listener; the pass floors
//! (`tcpguard-ebpf/src/bin/xdp_pass_floor.rs`) let their lookup decide the verdict.

use std::net::TcpListener;

use etherparse::{NetHeaders, PacketHeaders, TransportHeader};
use tcpguard_common::{FAMILY_IPV4, PORT_COUNT, PortTable, ProtectedPort, maps};
use tcpguard_tests::{
    frame::*,
    netns::in_fresh_netns,
    xdp::{self, XDP_DROP, XDP_PASS, XDP_TX, run_program},
};

const PORT: u16 = 8080;
const NO_LISTENER_PORT: u16 = 9090;

/// `answer` is the SYN-ACK to `syn`: addresses and ports swapped, SYN and ACK set, the SYN's
/// sequence number acknowledged, both checksums right.
fn assert_synack(syn: &TcpFrame, answer: &[u8]) {
    let headers = PacketHeaders::from_ethernet_slice(answer).expect("etherparse parses it");
    let ethernet = headers
        .link
        .and_then(|l| l.ethernet2())
        .expect("Ethernet II");
    assert_eq!(
        (ethernet.source, ethernet.destination),
        (syn.destination_mac, syn.source_mac)
    );
    let (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Tcp(tcp))) =
        (&headers.net, &headers.transport)
    else {
        panic!("an IPv4 TCP segment");
    };
    let Ip::V4 {
        source,
        destination,
        ..
    } = syn.ip
    else {
        panic!("an IPv4 SYN");
    };
    assert_eq!(
        (ip.source, ip.destination),
        (destination.octets(), source.octets())
    );
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 checksum"
    );
    assert_eq!(
        (tcp.source_port, tcp.destination_port),
        (syn.destination_port, syn.source_port)
    );
    assert!(
        tcp.syn && tcp.ack && !tcp.rst && !tcp.fin,
        "flags SYN and ACK"
    );
    assert_eq!(tcp.acknowledgment_number, syn.seq.wrapping_add(1));
    assert_eq!(
        tcp.checksum,
        tcp.calc_checksum_ipv4(ip, headers.payload.slice())
            .expect("a checksum"),
        "TCP checksum"
    );
}

#[test]
fn the_synack_floors_answer_syns_and_the_lookup_one_only_for_a_listener() {
    in_fresh_netns(|| {
        let _listener = TcpListener::bind(("0.0.0.0", PORT)).expect("listening on 8080");
        let syn = TcpFrame::syn_v4(PORT).with_options(linux_syn_options(1460, 1, 7));
        let unanswered = TcpFrame::syn_v4(NO_LISTENER_PORT);
        for name in ["xdp_synack_floor", "xdp_synack_floor_lookup"] {
            let mut object = xdp::load_floor(name);
            let program = xdp::floor(&mut object, name);
            let answer = run_program(program, &syn.bytes());
            assert_eq!(answer.action, XDP_TX, "{name} answers a SYN for a listener");
            assert_synack(&syn, &answer.frame);
            let ack = syn.clone().with_flags(ACK);
            assert_eq!(
                run_program(program, &ack.bytes()).action,
                XDP_PASS,
                "{name} passes an ACK"
            );
            let expected = if name == "xdp_synack_floor" {
                XDP_TX
            } else {
                XDP_PASS
            };
            assert_eq!(
                run_program(program, &unanswered.bytes()).action,
                expected,
                "{name} on a SYN to a port with no listener"
            );
        }
    });
}

#[test]
fn the_pass_floors_pass_what_their_lookup_finds() {
    in_fresh_netns(|| {
        let mut object = xdp::load_pass_floor();
        let mut ports: aya::maps::Array<_, PortTable> = object
            .map_mut(maps::PROTECTED_PORTS)
            .expect("the floor's port table")
            .try_into()
            .expect("an array of one table");
        let mut table: Box<PortTable> = vec![ProtectedPort::UNPROTECTED; PORT_COUNT as usize]
            .into_boxed_slice()
            .try_into()
            .unwrap();
        table[usize::from(PORT)] = ProtectedPort {
            families: FAMILY_IPV4,
            ..ProtectedPort::default()
        };
        ports.set(0, &*table, 0).expect("protecting 8080");
        let tracked = TcpFrame::syn_v4(PORT).with_flags(ACK);
        xdp::track_in_pass_floor(&mut object, &tracked.flow_key());

        let unprotected = xdp::floor(&mut object, "xdp_pass_unprotected");
        assert_eq!(
            run_program(unprotected, &tracked.bytes()).action,
            XDP_DROP,
            "a protected port"
        );
        let other_port = TcpFrame::syn_v4(PORT + 1).with_flags(ACK);
        assert_eq!(
            run_program(unprotected, &other_port.bytes()).action,
            XDP_PASS,
            "another port"
        );

        let flow = xdp::floor(&mut object, "xdp_pass_tracked");
        assert_eq!(
            run_program(flow, &tracked.bytes()).action,
            XDP_PASS,
            "the tracked flow"
        );
        let mut untracked = tracked.clone();
        untracked.source_port += 1;
        assert_eq!(
            run_program(flow, &untracked.bytes()).action,
            XDP_DROP,
            "another 4-tuple"
        );
    });
}
