//! Records the daemon writes into maps to configure the XDP program.

/// [`ProtectedPort::families`] bit: the port is protected for IPv4 destinations.
pub const FAMILY_IPV4: u8 = 1 << 0;
/// [`ProtectedPort::families`] bit: the port is protected for IPv6 destinations.
pub const FAMILY_IPV6: u8 = 1 << 1;

/// One entry of the [`PortTable`]; the entry's index is the TCP destination port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectedPort {
    /// Bitmask of [`FAMILY_IPV4`] and [`FAMILY_IPV6`]; zero means unprotected.
    pub families: u8,
    pub _pad: u8,
    /// A protected port's entry: the protected interface's own unicast MAC, which a frame must
    /// be sent to (see [`crate::is_for_interface`]); all-zero until the daemon knows it, which
    /// matches no frame. Kept here rather than in a map of its own so that the one lookup every
    /// protected segment makes, of its port, answers the MAC check too.
    pub interface_mac: [u8; 6],
}

impl ProtectedPort {
    /// The entry of a port tcpguard does not protect.
    pub const UNPROTECTED: Self = Self {
        families: 0,
        _pad: 0,
        interface_mac: [0; 6],
    };
}

/// The protected ports: one [`ProtectedPort`] per TCP port, indexed by the port (512 KiB).
///
/// The XDP program keeps it as global data, in a section of its own that the kernel holds as an
/// array map of one entry ([`crate::maps::PROTECTED_PORTS`]), rather than as an array map of
/// 65,536 entries: the lookup every frame makes is then a load at the table's address plus the
/// port, with no key on the stack and no lookup; a port cannot be past the end, which a 16-bit
/// mask shows the verifier. The daemon writes the table whole, in one map update.
pub type PortTable = [ProtectedPort; crate::PORT_COUNT as usize];

/// [`SynCookieConfig::window_scale`] value meaning "the kernel does not scale windows"
/// (`net.ipv4.tcp_window_scaling = 0`).
pub const NO_WINDOW_SCALE: u8 = 0xff;

/// How SYN-ACKs must look for the kernel to accept the cookie ACK and build a socket that
/// matches what the client was told. The daemon derives it from the protected namespace's
/// sysctls.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynCookieConfig {
    /// The window scale the kernel will compute for a socket built from a cookie
    /// (`tcp_select_initial_window`), or [`NO_WINDOW_SCALE`].
    pub window_scale: u8,
    /// Whether `net.ipv4.tcp_sack` is on; SACK-permitted is only offered when it is, since the
    /// kernel rejects a cookie whose timestamp claims SACK when SACK is off.
    pub sack: u8,
    /// TTL / hop limit of the SYN-ACK.
    pub ttl: u8,
    pub _pad: u8,
    /// Own cookies: whether ECN is accepted when a client asks for it (`net.ipv4.tcp_ecn`
    /// is not 0).
    pub ecn: u8,
    /// Own cookies: whether timestamps are answered (`net.ipv4.tcp_timestamps` is not 0).
    pub timestamps: u8,
    /// Own cookies: the MSS an IPv4 SYN-ACK advertises (the interface's MTU less 40); IPv6
    /// advertises 20 less.
    pub mss: u16,
}

impl Default for SynCookieConfig {
    fn default() -> Self {
        // Linux defaults: tcp_rmem[2] = 6 MiB gives window scale 7; SACK on; TTL 64.
        Self {
            window_scale: 7,
            sack: 1,
            ttl: 64,
            _pad: 0,
            ecn: 1,
            timestamps: 1,
            mss: 1460,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both are #[repr(C)], made of integers only, with no padding bytes (asserted
    // below for SynCookieConfig).
    unsafe impl aya::Pod for super::ProtectedPort {}
    unsafe impl aya::Pod for super::SynCookieConfig {}
}

/// [`Policy::lists`] bit: the deny tries hold entries.
pub const POLICY_DENY: u8 = 1 << 0;
/// [`Policy::lists`] bit: the allow tries hold entries.
pub const POLICY_ALLOW: u8 = 1 << 1;
/// [`Policy::lists`] bit: a per-source connection limit is set.
pub const POLICY_SOURCE_LIMIT: u8 = 1 << 2;
/// [`Policy::lists`] bit: the allow and deny tries in force are slot 1's (clear: slot 0's).
/// A reload fills the other slot's tries while these stay in force, then switches with one
/// write of this byte, so that a packet always meets one whole list, the old or the new.
pub const POLICY_SLOT: u8 = 1 << 3;

/// Which source policies are in force, so that the XDP program skips the lookups of empty ones,
/// and which slot's tries hold them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// [`POLICY_DENY`], [`POLICY_ALLOW`], [`POLICY_SOURCE_LIMIT`], [`POLICY_SLOT`].
    pub lists: u8,
    pub _pad: [u8; 7],
}

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], integers only, padding spelled out.
unsafe impl aya::Pod for Policy {}

const _: () = assert!(core::mem::size_of::<SynCookieConfig>() == 8);
