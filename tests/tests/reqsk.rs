//! The TC ingress classifier `tcpguard_reqsk` (tcpguard-ebpf/c/reqsk.c) on a real kernel: it
//! loads, attaches to a veth's ingress, is pinned, adopted and detached like tcpguard's other
//! programs, and it turns a handcrafted ACK that carries the cookie record into a connection
//! the kernel builds from that record, which the kernel then reports through TCP_INFO.
//!
//! The record is put in front of the ACK by a test-only XDP program (xdp-cookie-ack), standing
//! in for tcpguard's XDP program. BPF_PROG_TEST_RUN cannot carry this test: on Linux 6.18 a
//! SCHED_CLS test run refuses a `__sk_buff` context with `data_meta` set (EINVAL), so no record
//! can be given; the kfunc refuses any skb that is not at TC ingress; and a test-run skb never
//! reaches the TCP stack, so no connection could come of it.

use std::{
    ffi::CString,
    io,
    net::{SocketAddrV4, TcpListener},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use tcpguard::reqsk::{self, Reqsk, ReqskResults};
use tcpguard_common::{
    COOKIE_ACK_LEN, COOKIE_ACK_MAGIC, COOKIE_ACK_SACK, COOKIE_ACK_WSCALE, CookieAck,
};
use tcpguard_tests::{
    netns::Namespace,
    observe::{
        Negotiated, TCPI_OPT_ECN, TCPI_OPT_SACK, TCPI_OPT_TIMESTAMPS, TCPI_OPT_WSCALE, negotiated,
    },
    raw::{RawTcp, Segment},
    rig::{self, CLIENT, Rig, SERVER, SERVER_IF, accept_within},
};

const PORT: u16 = 8080;

/// Removes a pin directory when dropped, also when the test panics: a pinned link keeps its
/// program attached for as long as its pin exists.
struct Pins(PathBuf);

impl Pins {
    fn for_namespace(namespace: &Namespace) -> Self {
        rig::ensure_bpffs();
        let dir = PathBuf::from(format!("/sys/fs/bpf/{}-reqsk", namespace.name));
        tcpguard::bpffs::remove_pins(&dir).expect("clearing a stale pin directory");
        Self(dir)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = tcpguard::bpffs::remove_pins(&self.0);
    }
}

/// The ids of the programs attached to `interface`'s TC ingress in the calling thread's
/// namespace.
fn ingress_programs(interface: &str) -> Vec<u32> {
    let name = CString::new(interface).unwrap();
    let (_, programs) =
        SchedClassifier::query_tcx(name.as_c_str(), TcAttachType::Ingress).expect("query_tcx");
    programs.iter().map(|program| program.id()).collect()
}

fn pinned_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn loads_attaches_pins_adopts_and_detaches() {
    assert!(
        reqsk::kfunc_available(),
        "this kernel has no bpf_sk_assign_tcp_reqsk"
    );
    let namespace = Namespace::new("reqsk");
    namespace.run(
        "ip",
        &["link", "add", "rq0", "type", "veth", "peer", "name", "rq1"],
    );
    namespace.run("ip", &["link", "set", "rq0", "up"]);
    let pins = Pins::for_namespace(&namespace);
    let dir = pins.0.clone();
    namespace.within(move || {
        let mut first = Reqsk::load(Some(&dir)).expect("loading tcpguard_reqsk");
        let verified = first.verified_instructions();
        eprintln!("verifier: {verified:?} instructions processed");
        assert!(verified.is_some_and(|count| count > 0));
        first.attach("rq0").expect("attaching at rq0's ingress");
        assert_eq!(first.interface(), Some("rq0"));
        assert_eq!(
            pinned_names(&dir),
            ["REQSK_RESULTS", "link_reqsk_rq0", "prog_tcpguard_reqsk"]
        );
        let attached = ingress_programs("rq0");
        assert_eq!(attached.len(), 1, "one program at rq0's ingress");
        assert_eq!(first.results().unwrap(), ReqskResults::default());

        // A restarted daemon adopts the pinned link: the program in it is replaced, and the
        // link, not a second one, stays.
        first.release().expect("leaving the program attached");
        assert_eq!(
            ingress_programs("rq0"),
            attached,
            "still attached after release"
        );
        let mut second = Reqsk::load(Some(&dir)).expect("loading again");
        second.attach("rq0").expect("adopting the pinned link");
        let adopted = ingress_programs("rq0");
        assert_eq!(adopted.len(), 1, "the pinned link was reused, not doubled");
        assert_ne!(adopted, attached, "the new program replaced the old one");
        assert!(matches!(
            Reqsk::load(Some(&dir)).unwrap().attach("rq1"),
            Err(tcpguard::reqsk::ReqskError::OtherInterface { .. })
        ));

        second.detach().expect("detaching");
        assert!(ingress_programs("rq0").is_empty(), "detached");
        assert!(pinned_names(&dir).is_empty(), "its pins are gone");

        // `tcpguard detach` (bpffs::remove_pins) takes this link down too.
        let mut third = Reqsk::load(Some(&dir)).expect("loading a third time");
        third.attach("rq0").expect("attaching again");
        third.release().unwrap();
        assert_eq!(ingress_programs("rq0").len(), 1);
        tcpguard::bpffs::remove_pins(&dir).expect("tcpguard detach");
        assert!(
            ingress_programs("rq0").is_empty(),
            "detached by remove_pins"
        );
        assert!(!dir.exists());

        // A link whose interface is gone is attached to nothing, and is refused as such.
        let mut fourth = Reqsk::load(Some(&dir)).expect("loading a fourth time");
        fourth.attach("rq0").expect("attaching once more");
        fourth.release().unwrap();
        let ip = |args: &[&str]| {
            let status = std::process::Command::new("ip").args(args).status();
            assert!(status.is_ok_and(|status| status.success()), "ip {args:?}");
        };
        ip(&["link", "del", "rq0"]);
        ip(&["link", "add", "rq2", "type", "veth", "peer", "name", "rq3"]);
        ip(&["link", "set", "rq2", "up"]);
        let refused = Reqsk::load(Some(&dir)).unwrap().attach("rq2");
        match refused {
            Err(err @ tcpguard::reqsk::ReqskError::StrayLink { .. }) => assert!(
                err.to_string().contains(
                    "is attached to no interface of this network namespace (the one it was attached to is gone, or in another namespace); run `tcpguard detach` before attaching it to rq2"
                ),
                "{err}"
            ),
            other => panic!("attaching to rq2: {other:?}"),
        }
        tcpguard::bpffs::remove_pins(&dir).expect("tcpguard detach");
        assert!(!dir.exists());
    });
    drop(pins);
}

fn out_rsts(namespace: &Namespace) -> u64 {
    rig::kernel_counters(namespace)
        .get("TcpOutRsts")
        .copied()
        .expect("nstat reports TcpOutRsts")
}

const TCP_ESTABLISHED: u8 = 1;

#[test]
fn an_ack_with_the_record_becomes_a_connection_and_without_it_draws_a_reset() {
    let rig = Rig::new();
    let pins = Pins::for_namespace(&rig.server);
    // The sysctls stay at a new namespace's defaults: the kfunc path needs none of the
    // listener-mode cookie settings.
    for (name, default) in [
        ("net/ipv4/tcp_syncookies", "1"),
        ("net/ipv4/tcp_timestamps", "1"),
    ] {
        let value = rig.server.run("cat", &[&format!("/proc/sys/{name}")]);
        assert_eq!(
            String::from_utf8_lossy(&value.stdout).trim(),
            default,
            "{name}"
        );
    }
    let dir = pins.0.clone();
    let (listener, classifier, mut marker) = rig.server.within(move || {
        let listener = TcpListener::bind((SERVER, PORT)).expect("server listens");
        let mut classifier = Reqsk::load(Some(&dir)).expect("loading tcpguard_reqsk");
        classifier
            .attach(SERVER_IF)
            .expect("attaching at the server's ingress");
        let mut marker = aya::Ebpf::load(tcpguard::ebpf::XDP_COOKIE_ACK_OBJECT).unwrap();
        let program: &mut Xdp = marker
            .program_mut("xdp_cookie_ack")
            .unwrap()
            .try_into()
            .unwrap();
        program.load().expect("loading xdp_cookie_ack");
        let interface = CString::new(SERVER_IF).unwrap();
        program
            .attach(&interface, XdpMode::Driver)
            .expect("attaching xdp_cookie_ack to the server's veth end");
        (listener, classifier, marker)
    });
    let mut arm = |record: CookieAck| {
        // CookieAck is plain old data of COOKIE_ACK_LEN bytes; aya writes it as bytes.
        // SAFETY: reading the bytes of a repr(C) struct without padding holes.
        let bytes: [u8; COOKIE_ACK_LEN] = unsafe { std::mem::transmute(record) };
        let mut map: aya::maps::Array<_, [u8; COOKIE_ACK_LEN]> =
            aya::maps::Array::try_from(marker.map_mut("RECORD").unwrap()).unwrap();
        map.set(0, &bytes, 0).expect("writing the record");
    };

    // A 4-tuple whose SYN the server never saw; the ACK acknowledges a server ISN the server
    // never chose (the kernel takes it from ack - 1).
    let client = SocketAddrV4::new(CLIENT, 40_001);
    let server = SocketAddrV4::new(SERVER, PORT);
    let segment = Segment::ack(client, server, 0x1000_0000, 0x2000_0001);
    let send = || {
        rig.client.within({
            let segment = segment.clone();
            move || RawTcp::open().send(&segment)
        })
    };

    // Without the record: the kernel's own cookie check (tcp_syncookies=1, no recent overflow)
    // finds no request, and the listener answers the ACK with a reset.
    let rsts = out_rsts(&rig.server);
    let before = classifier.results().unwrap();
    send();
    let deadline = Instant::now() + Duration::from_secs(3);
    while out_rsts(&rig.server) == rsts && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let reset = out_rsts(&rig.server) - rsts;
    let moved = classifier.results().unwrap().since(&before);
    eprintln!("without the record: TcpOutRsts +{reset}, reqsk results {moved:?}");
    assert_eq!(reset, 1, "the listener reset the unknown ACK");
    assert_eq!(
        moved,
        ReqskResults::default(),
        "the classifier left it alone"
    );
    assert!(accept_within(&listener, Duration::from_millis(200)).is_none());

    // With the record: the same ACK becomes a connection built from the record's options.
    arm(CookieAck {
        magic: COOKIE_ACK_MAGIC,
        rcv_tsval: 0,
        rcv_tsecr: 0,
        mss: 1400,
        rcv_wscale: 7,
        snd_wscale: 6,
        flags: COOKIE_ACK_WSCALE | COOKIE_ACK_SACK,
        _pad: [0; 3],
    });
    let rsts = out_rsts(&rig.server);
    let before = classifier.results().unwrap();
    send();
    let stream =
        accept_within(&listener, Duration::from_secs(3)).expect("accept() returns the connection");
    let peer = stream.peer_addr().unwrap();
    let Negotiated {
        state,
        options,
        snd_wscale,
        rcv_wscale,
        snd_mss,
    } = negotiated(&stream);
    // Give a reset, if the kernel were to send one, time to be counted.
    thread::sleep(Duration::from_millis(200));
    let reset = out_rsts(&rig.server) - rsts;
    let moved = classifier.results().unwrap().since(&before);
    eprintln!(
        "with the record: peer {peer}, TCP_INFO state {state} options {options:#x} \
         wscale {snd_wscale},{rcv_wscale} snd_mss {snd_mss}; TcpOutRsts +{reset}; \
         reqsk results {moved:?}"
    );
    assert_eq!(peer, std::net::SocketAddr::V4(client));
    assert_eq!(state, TCP_ESTABLISHED);
    assert_eq!(
        options & (TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_WSCALE | TCPI_OPT_ECN),
        TCPI_OPT_SACK | TCPI_OPT_WSCALE,
        "SACK and window scaling on, no timestamps, no ECN, as the record said"
    );
    assert_eq!(
        (snd_wscale, rcv_wscale),
        (6, 7),
        "the record's window scales"
    );
    assert_eq!(
        snd_mss, 1400,
        "the record's MSS (no timestamp option to subtract)"
    );
    assert_eq!(reset, 0, "no reset");
    assert_eq!(
        moved,
        ReqskResults {
            assigned: 1,
            ..Default::default()
        }
    );

    // The same ACK again, the record on it: the kernel has the connection already (as when XDP
    // judged a segment before the stack built the connection from an earlier one), so the
    // program leaves it to that connection, which takes it as a duplicate ACK.
    let rsts = out_rsts(&rig.server);
    let before = classifier.results().unwrap();
    send();
    let deadline = Instant::now() + Duration::from_secs(3);
    while classifier.results().unwrap() == before && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        classifier.results().unwrap().since(&before),
        ReqskResults {
            kernel_socket: 1,
            ..Default::default()
        }
    );
    assert_eq!(out_rsts(&rig.server), rsts, "no reset");
    assert_eq!(negotiated(&stream).state, TCP_ESTABLISHED);

    drop(stream);
    drop(listener);
    classifier.detach().expect("detaching");
    drop(marker);
    drop(pins);
    drop(rig);
}

/// A per-CPU array of `entries` u64 counters pinned at `path`, made with the bpf syscall itself
/// (aya makes maps only from an object): what an earlier tcpguard that counted fewer outcomes
/// left pinned as REQSK_RESULTS.
fn pin_counters(path: &Path, entries: u32) {
    use std::os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries, the rest 0.
    let mut create = [0u32; 32];
    create[..4].copy_from_slice(&[BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, entries]);
    // SAFETY: the attribute buffer is valid for the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            create.as_ptr(),
            size_of_val(&create),
        )
    };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = CString::new(path.as_os_str().as_bytes()).unwrap();
    // union bpf_attr for BPF_OBJ_PIN: pathname (a pointer), then bpf_fd and file_flags (0).
    let pin: [u64; 2] = [path.as_ptr() as u64, map.as_raw_fd() as u64];
    // SAFETY: the attribute buffer is valid for the size passed, and pathname points at a NUL-
    // terminated string that outlives the call.
    let status =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), size_of_val(&pin)) };
    assert_eq!(status, 0, "BPF_OBJ_PIN: {}", io::Error::last_os_error());
}

/// A REQSK_RESULTS an earlier tcpguard pinned with four outcome counters is replaced by one
/// with as many as the program counts: aya refuses a pinned map of another size, so tcpguard
/// would not start after the upgrade (seen: `IncompatiblePinnedMap`, max_entries 5 against 4).
#[test]
fn an_outgrown_pinned_results_map_is_replaced() {
    let namespace = Namespace::new("reqskpin");
    let pins = Pins::for_namespace(&namespace);
    let dir = pins.0.clone();
    namespace.within(move || {
        tcpguard::bpffs::prepare_pin_dir(&dir).expect("making the pin directory");
        let pin = dir.join(reqsk::RESULTS_MAP);
        pin_counters(&pin, 4);
        let loaded = Reqsk::load(Some(&dir)).expect("loading over the outgrown pin");
        assert_eq!(loaded.results().unwrap(), ReqskResults::default());
        let entries = aya::maps::MapData::from_pin(&pin)
            .and_then(|map| map.info())
            .map(|info| info.max_entries())
            .expect("the pinned map");
        assert_eq!(entries, 5, "the pin holds the program's own map");
    });
    drop(pins);
}
