//! What the XDP program hands the TC ingress program (`tcpguard-ebpf/c/reqsk.c`) with an ACK
//! whose own cookie it accepted: the attributes the kernel builds the connection from, through
//! the kfunc `bpf_sk_assign_tcp_reqsk`. The record travels in the XDP metadata area in front
//! of the packet (`bpf_xdp_adjust_meta`), which the kernel keeps for TC as `__sk_buff.data_meta`:
//! no map between the two programs, nothing left behind when the packet is gone.
//!
//! The C program declares the same layout (`struct tcpguard_cookie_ack`); a test compares the
//! two through the C object's BTF.

/// [`CookieAck::magic`]: the record is tcpguard's, not another XDP program's metadata.
pub const COOKIE_ACK_MAGIC: u32 = u32::from_le_bytes(*b"tgck");

/// [`CookieAck::flags`] bit: both ends agreed on ECN.
pub const COOKIE_ACK_ECN: u8 = 1 << 0;
/// [`CookieAck::flags`] bit: both ends scale windows.
pub const COOKIE_ACK_WSCALE: u8 = 1 << 1;
/// [`CookieAck::flags`] bit: SACK is permitted.
pub const COOKIE_ACK_SACK: u8 = 1 << 2;
/// [`CookieAck::flags`] bit: both ends send timestamps.
pub const COOKIE_ACK_TIMESTAMPS: u8 = 1 << 3;

/// The decoded cookie, in the shape of the kernel's `struct bpf_tcp_req_attrs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CookieAck {
    /// [`COOKIE_ACK_MAGIC`].
    pub magic: u32,
    /// The client's TSval in this ACK (valid with [`COOKIE_ACK_TIMESTAMPS`]).
    pub rcv_tsval: u32,
    /// The TSval tcpguard's SYN-ACK sent, echoed by this ACK: the kernel derives the
    /// connection's timestamp offset from it.
    pub rcv_tsecr: u32,
    /// The client's MSS, as the cookie encodes it.
    pub mss: u16,
    /// The window scale tcpguard's SYN-ACK advertised (the kernel does not recompute it).
    pub rcv_wscale: u8,
    /// The client's window scale.
    pub snd_wscale: u8,
    /// [`COOKIE_ACK_ECN`], [`COOKIE_ACK_WSCALE`], [`COOKIE_ACK_SACK`], [`COOKIE_ACK_TIMESTAMPS`].
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// Bytes of metadata the record takes: a multiple of 4, as `bpf_xdp_adjust_meta` requires.
pub const COOKIE_ACK_LEN: usize = core::mem::size_of::<CookieAck>();
const _: () = assert!(COOKIE_ACK_LEN == 20 && COOKIE_ACK_LEN.is_multiple_of(4));
