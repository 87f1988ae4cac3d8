//! A SYN flood generator far faster than hping3: BPF_PROG_TEST_RUN in live-frames mode. The
//! kernel runs the `xdp_syn_flood` program (tcpguard-ebpf/src/bin/xdp_syn_flood.rs) on copies
//! of one SYN; the program gives each a random source address, port and sequence number and
//! redirects it out of an interface, as XDP_REDIRECT would from a NIC. Over a veth pair the SYNs
//! reach the peer as XDP frames, the way a NIC driver hands them up, not as socket buffers a
//! sender has already built.
//!
//! It runs in the calling thread, so inside whatever network namespace that thread has entered,
//! and it stops by itself after a time and a packet count.

use std::{
    ffi::CString,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::{
    EbpfLoader,
    programs::{TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};

use crate::frame::{Ip, TcpFrame};

/// Frames per BPF_PROG_TEST_RUN call: about 30 ms of sending, the granularity of the time limit.
const FRAMES_PER_CALL: u64 = 100_000;
/// The largest SYN frame the generator holds (`SYN` in xdp_syn_flood.rs).
const SYN_CAPACITY: usize = 128;
/// Frames the kernel runs and redirects before it flushes them to the interface.
const BATCH: u32 = 64;

/// What to send: SYNs to `destination:port` over `interface`, from random addresses in
/// `sources` and random ports.
pub struct SynFlood {
    pub interface: String,
    pub source_mac: [u8; 6],
    pub destination_mac: [u8; 6],
    /// Network and prefix length the random sources are drawn from.
    pub sources: (Ipv4Addr, u8),
    pub destination: Ipv4Addr,
    pub port: u16,
    /// TCP options of every SYN.
    pub options: Vec<u8>,
}

/// What a flood did.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// SYNs the generator redirected to the interface. Those its peer had no room for are
    /// dropped there, as a NIC drops what its ring cannot hold.
    pub packets: u64,
    pub seconds: f64,
}

impl Sent {
    pub fn rate(&self) -> f64 {
        self.packets as f64 / self.seconds
    }
}

impl SynFlood {
    /// Sends until `duration` has passed or `limit` frames have gone, whichever comes first.
    pub fn run(&self, duration: Duration, limit: u64) -> Result<Sent, String> {
        let name = CString::new(self.interface.as_str()).map_err(|err| err.to_string())?;
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(format!(
                "there is no interface {} in this network namespace",
                self.interface
            ));
        }
        let (network, prefix) = self.sources;
        let host_mask = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
        let network = u32::from(network) & !host_mask;
        let syn = TcpFrame {
            source_mac: self.source_mac,
            destination_mac: self.destination_mac,
            ip: Ip::V4 {
                source: self.sources.0,
                destination: self.destination,
                options: Vec::new(),
            },
            ..TcpFrame::syn_v4(self.port)
        }
        .with_options(self.options.clone())
        .bytes();
        let mut syn_bytes = [0u8; SYN_CAPACITY];
        syn_bytes
            .get_mut(..syn.len())
            .ok_or_else(|| {
                format!(
                    "a SYN of {} bytes does not fit the generator's {SYN_CAPACITY}",
                    syn.len()
                )
            })?
            .copy_from_slice(&syn);
        let syn_len = syn.len() as u32;
        let mut ebpf = EbpfLoader::new()
            .override_global("SYN", &syn_bytes, true)
            .override_global("SYN_LEN", &syn_len, true)
            .override_global("TARGET_IFINDEX", &ifindex, true)
            .override_global("SOURCE_NETWORK", &network, true)
            .override_global("SOURCE_HOST_MASK", &host_mask, true)
            .load(tcpguard::ebpf::XDP_SYN_FLOOD_OBJECT)
            .map_err(|err| format!("cannot load the SYN generator: {err}"))?;
        let program: &mut Xdp = ebpf
            .program_mut("xdp_syn_flood")
            .ok_or("the SYN generator's object has no xdp_syn_flood program")?
            .try_into()
            .map_err(|err| format!("xdp_syn_flood is not an XDP program: {err}"))?;
        program
            .load()
            .map_err(|err| format!("the kernel refused the SYN generator: {err}"))?;

        let start = Instant::now();
        let mut packets = 0;
        while packets < limit && start.elapsed() < duration {
            let frames = FRAMES_PER_CALL.min(limit - packets);
            program
                .test_run(TestRunOptions {
                    data_in: Some(&syn),
                    repeat: frames as u32,
                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                    ..Default::default()
                })
                .map_err(|err| format!("BPF_PROG_TEST_RUN in live-frames mode failed: {err}"))?;
            packets += frames;
        }
        Ok(Sent {
            packets,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}
