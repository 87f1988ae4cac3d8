//! Changing what the data plane enforces without a moment of neither: allow and deny lists
//! are written beside the ones in force and switched to in one write, a list that does not
//! fit leaves the ones in force as they were, and a change of ports is one write of the whole
//! port table. Run by the kernel (BPF_PROG_TEST_RUN) in a namespace each test makes.

use std::{collections::BTreeSet, net::TcpListener};

use aya::maps::{Array, MapData};
use tcpguard::{Guard, config::SourcePolicy, prefix::Prefix};
use tcpguard_common::{
    Counter, FAMILY_IPV4, FAMILY_IPV6, POLICY_CAPACITY, PortTable, ProtectedPort, maps,
};
use tcpguard_tests::{
    frame::{CLIENT_V4, SERVER_MAC, TcpFrame},
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

/// The guard's port table as the kernel holds it, read beside the guard through the program's
/// map ids.
fn port_table(guard: &Guard) -> Box<PortTable> {
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
        .expect("the program uses its port table");
    let table: Array<MapData, PortTable> = Array::try_from(aya::maps::Map::Array(map)).unwrap();
    // The table is 512 KiB, read by value: on a thread with room for it.
    std::thread::Builder::new()
        .stack_size(16 << 20)
        .spawn(move || Box::new(table.get(&0, 0).expect("the table's one entry")))
        .unwrap()
        .join()
        .unwrap()
}

/// Each change of ports leaves exactly the new ports protected, on the interface's MAC, in the
/// table the program reads; a port taken out passes as unprotected.
#[test]
fn a_change_of_ports_leaves_exactly_the_new_ports_protected() {
    in_fresh_netns(|| {
        let _listener = TcpListener::bind(("0.0.0.0", PORT)).unwrap();
        let mut guard = xdp::load(&[PORT]);
        for ports in [
            BTreeSet::from([PORT, PORT + 1, 9999]),
            BTreeSet::from([PORT + 1]),
        ] {
            guard.set_ports(&ports).unwrap();
            let table = port_table(&guard);
            let protected: Vec<(u16, ProtectedPort)> = (0..=u16::MAX)
                .map(|port| (port, table[usize::from(port)]))
                .filter(|&(_, entry)| entry != ProtectedPort::UNPROTECTED)
                .collect();
            let expected: Vec<(u16, ProtectedPort)> = ports
                .iter()
                .map(|&port| {
                    let entry = ProtectedPort {
                        families: FAMILY_IPV4 | FAMILY_IPV6,
                        _pad: 0,
                        interface_mac: SERVER_MAC,
                    };
                    (port, entry)
                })
                .collect();
            assert_eq!(protected, expected, "the table after protecting {ports:?}");
        }
        assert_eq!(
            syn_verdict(&guard, PORT),
            (XDP_PASS, vec![(Counter::Unprotected, 1)])
        );
    });
}
