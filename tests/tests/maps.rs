//! The maps of the built eBPF objects, as the kernel creates them, against the names
//! `tcpguard_common::maps` lists: a map added to a program and not to the list (or listed and
//! gone from the programs) fails here rather than when the daemon pins or looks it up.

use std::collections::BTreeSet;

use aya::Ebpf;
use tcpguard::ebpf::{REQSK_OBJECT, TCPGUARD_OBJECT};
use tcpguard_common::maps;

/// The names of the maps loading `object` creates, each once. Read-only data sections
/// (`.rodata`, `.rodata.cst32`: aya-log's level and the log lines' constant parts), which aya
/// also presents as maps, are not named by the programs and are left out; the port table's
/// section (`.bss.ports`) is named, and listed.
fn map_names(object: &[u8]) -> Vec<String> {
    let ebpf = Ebpf::load(object).expect("loading the object's maps");
    let mut names: Vec<String> = ebpf
        .maps()
        .map(|(name, _)| name.to_owned())
        .filter(|name| !name.starts_with(".rodata"))
        .collect();
    names.sort();
    names
}

fn sorted(lists: &[&[&str]]) -> Vec<String> {
    let names: Vec<String> = lists
        .iter()
        .flat_map(|list| list.iter().map(|&name| name.to_owned()))
        .collect();
    let unique: BTreeSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), names.len(), "a map listed twice: {names:?}");
    unique.into_iter().cloned().collect()
}

#[test]
fn tcpguards_object_has_exactly_the_listed_maps() {
    assert_eq!(
        map_names(TCPGUARD_OBJECT),
        sorted(&[maps::ALL, maps::UNPINNED, maps::SCRATCH]),
        "tcpguard-ebpf's maps against tcpguard_common::maps"
    );
}

#[test]
fn the_tc_ingress_object_has_exactly_the_listed_maps() {
    assert_eq!(
        map_names(REQSK_OBJECT),
        sorted(&[maps::REQSK_OBJECT]),
        "c/reqsk.c's maps against tcpguard_common::maps::REQSK_OBJECT"
    );
}

/// The C program's rare-event ring is the size tcpguard-common gives it: `reqsk.c` writes the
/// number out, as it cannot import the constant.
#[test]
fn the_tc_ingress_rare_event_ring_has_the_shared_size() {
    let ebpf = Ebpf::load(REQSK_OBJECT).expect("loading the object's maps");
    let Some(aya::maps::Map::RingBuf(ring)) = ebpf.map(maps::RARE_EVENTS) else {
        panic!("reqsk.c has no ring buffer {}", maps::RARE_EVENTS);
    };
    assert_eq!(
        ring.info().expect("the ring's info").max_entries(),
        tcpguard_common::RARE_EVENT_RING_BYTES
    );
}
