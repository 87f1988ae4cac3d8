//! The protected ports as global data ([`tcpguard_common::PortTable`]).

use core::{cell::UnsafeCell, ptr};

use tcpguard_common::{PortTable, ProtectedPort};

/// The [`PortTable`] a program reads and the daemon writes, through the kernel, while the
/// program runs. A program declares its own as a static in section `.bss.ports`, which aya
/// loads as the array map [`tcpguard_common::maps::PROTECTED_PORTS`]:
///
/// ```ignore
/// #[unsafe(link_section = ".bss.ports")]
/// static PROTECTED_PORTS: Ports = Ports::new();
/// ```
#[repr(transparent)]
pub struct Ports(UnsafeCell<PortTable>);

// SAFETY: the program only reads the table; the kernel writes it on the daemon's behalf.
unsafe impl Sync for Ports {}

impl Default for Ports {
    fn default() -> Self {
        Self::new()
    }
}

impl Ports {
    /// Every port unprotected, as the section holds it until the daemon writes it.
    pub const fn new() -> Self {
        Self(UnsafeCell::new(
            [ProtectedPort::UNPROTECTED; tcpguard_common::PORT_COUNT as usize],
        ))
    }

    /// [`ProtectedPort::families`] of `port`.
    #[inline(always)]
    pub fn families(&self, port: u16) -> u8 {
        // SAFETY: inside the table, as the entry's. Read volatile: the compiler sees no write
        // to the table and would otherwise take it to hold its initial zeros.
        unsafe { ptr::read_volatile(&raw const (*self.entry(port)).families) }
    }

    /// [`ProtectedPort::interface_mac`] of `port`.
    #[inline(always)]
    pub fn interface_mac(&self, port: u16) -> [u8; 6] {
        // SAFETY: as in `families`.
        unsafe { ptr::read_volatile(&raw const (*self.entry(port)).interface_mac) }
    }

    /// `port`'s entry: a u16 cannot index past the table's 65,536 entries.
    #[inline(always)]
    fn entry(&self, port: u16) -> *const ProtectedPort {
        // SAFETY: index(port) < PORT_COUNT, the table's length.
        unsafe { self.0.get().cast::<ProtectedPort>().add(index(port)) }
    }
}

/// `port` as an index whose bound the verifier sees. The port comes out of a byte swap, whose
/// result a verifier that does not track a swap's bits takes as unbounded: without the mask,
/// Debian 12's 6.1 and 13's 6.12 refuse both programs ("math between map_value pointer and
/// register with unbounded min value is not allowed", in the VM test), where 6.18.44 takes
/// them. Masked to 16 bits, it is bounded; the mask is one instruction LLVM cannot see
/// through, since it knows a u16 needs none and would drop it.
#[inline(always)]
fn index(port: u16) -> usize {
    #[cfg(target_arch = "bpf")]
    {
        let mut index = u64::from(port);
        // SAFETY: one ALU instruction on a register.
        unsafe {
            core::arch::asm!(
                "{0} &= 0xffff",
                inout(reg) index,
                options(pure, nomem, nostack, preserves_flags)
            );
        }
        index as usize
    }
    #[cfg(not(target_arch = "bpf"))]
    usize::from(port)
}
