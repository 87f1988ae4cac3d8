//! Changing what the data plane enforces without a moment of neither: allow and deny lists
//! are written beside the ones in force and switched to in one write, a list that does not
//! fit leaves the ones in force as they were, and a change of ports writes only the ports
//! that change. Run by the kernel (BPF_PROG_TEST_RUN) in a namespace each test makes.

use std::{collections::BTreeSet, net::TcpListener};

use aya::maps::{Array, MapData};
use tcpguard::{Guard, config::SourcePolicy, prefix::Prefix};
use tcpguard_common::{Counter, POLICY_CAPACITY, ProtectedPort, maps};
use tcpguard_tests::{
    frame::{CLIENT_V4, TcpFrame},
    netns::in_fresh_netns,
    xdp::{self, XDP_DROP, XDP_PASS, XDP_TX},
};

const PORT: u16 = 8080;

/// The verdict on a SYN from [`CLIENT_V4`] to `port`, and the counter that moved.
fn syn_verdict(guard: &Guard, port: u16) -> (u32, Vec<(Counter, u64)>) {
    let (outcome, moved) = xdp::run_counted(guard, &TcpFrame::syn_v4(port).bytes());
    (outcome.action, moved.nonzero().collect())
}

/// `count` distinct IPv4 /32s in 172.16.0.0/12, none of them the client's.
fn other_hosts(count: u32) -> Vec<Prefix> {
    (0..count)
        .map(|n| Prefix {
            address: std::net::Ipv4Addr::from(0xac10_0000 + n).into(),
            length: 32,
        })
        .collect()
}

fn client() -> Prefix {
    Prefix {
        address: CLIENT_V4.into(),
        length: 32,
    }
}

#[test]
fn a_list_that_does_not_fit_leaves_the_lists_in_force() {
    in_fresh_netns(|| {
        let _listener = TcpListener::bind(("0.0.0.0", PORT)).unwrap();
        let mut guard = xdp::load(&[PORT]);
        let denied = SourcePolicy {
            deny: vec![client()],
            ..SourcePolicy::default()
        };
        guard.set_policy(&denied).unwrap();
        assert_eq!(
            syn_verdict(&guard, PORT),
            (XDP_DROP, vec![(Counter::DeniedSource, 1)])
        );
        // More prefixes than a trie holds, past the configuration's own check: the kernel
        // refuses the last one.
        let too_many = SourcePolicy {
            deny: other_hosts(POLICY_CAPACITY + 1),
            ..SourcePolicy::default()
        };
        assert!(guard.set_policy(&too_many).is_err());
        assert_eq!(
            syn_verdict(&guard, PORT),
            (XDP_DROP, vec![(Counter::DeniedSource, 1)]),
            "the deny list in force before the refused change still holds"
        );

        // The same for an allow list: still allowed after a refused change.
        let allowed = SourcePolicy {
            allow: vec![client()],
            ..SourcePolicy::default()
        };
        guard.set_policy(&allowed).unwrap();
        assert_eq!(
            syn_verdict(&guard, PORT),
            (XDP_PASS, vec![(Counter::AllowedSource, 1)])
        );
        let too_many = SourcePolicy {
            allow: other_hosts(POLICY_CAPACITY + 1),
            ..SourcePolicy::default()
        };
        assert!(guard.set_policy(&too_many).is_err());
        assert_eq!(
            syn_verdict(&guard, PORT).1,
            vec![(Counter::AllowedSource, 1)]
        );

        // And a change that fits takes effect whole.
        guard.set_policy(&SourcePolicy::default()).unwrap();
        assert_eq!(
            syn_verdict(&guard, PORT),
            (XDP_TX, vec![(Counter::SynCookieSent, 1)])
        );
    });
}

/// The guard's PROTECTED_PORTS, opened beside it through the program's map ids.
fn protected_ports(guard: &Guard) -> Array<MapData, ProtectedPort> {
    let ids = guard
        .program()
        .info()
        .unwrap()
        .map_ids()
        .unwrap()
        .expect("the kernel lists the program's maps");
    let map = ids
        .into_iter()
        .map(|id| MapData::from_id(id).unwrap())
        .find(|map| {
            map.info()
                .is_ok_and(|info| info.name_as_str() == Some(maps::PROTECTED_PORTS))
        })
        .expect("the program uses PROTECTED_PORTS");
    Array::try_from(aya::maps::Map::Array(map)).unwrap()
}

#[test]
fn a_change_of_ports_writes_only_the_ports_that_change() {
    in_fresh_netns(|| {
        let _listener = TcpListener::bind(("0.0.0.0", PORT)).unwrap();
        let mut guard = xdp::load(&[PORT]);
        let mut beside = protected_ports(&guard);
        // A mark no write of tcpguard's makes, on a port that stays unprotected.
        let mark = ProtectedPort {
            families: 0x80,
            ..ProtectedPort::default()
        };
        beside.set(9999, &mark, 0).unwrap();
        guard.set_ports(&BTreeSet::from([PORT, PORT + 1])).unwrap();
        assert_eq!(
            beside.get(&9999, 0).unwrap(),
            mark,
            "a port that did not change was not written"
        );
        let protected = |port: u32| beside.get(&port, 0).unwrap().families != 0;
        assert!(protected(u32::from(PORT)) && protected(u32::from(PORT + 1)));
        guard.set_ports(&BTreeSet::from([PORT + 1])).unwrap();
        assert!(!protected(u32::from(PORT)) && protected(u32::from(PORT + 1)));
        assert_eq!(
            syn_verdict(&guard, PORT),
            (XDP_PASS, vec![(Counter::Unprotected, 1)])
        );
    });
}
