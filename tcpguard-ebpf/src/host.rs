//! Is this segment the host's own? tcpguard may judge or answer a segment only where the
//! kernel would hand it to a local socket; everything else passes untouched (see
//! `tcpguard_common::is_martian`).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use tcpguard_common::{
    Counter, FlowKey, HOST_ADDRESSES_CAPACITY, HostAddress, HostFilter, is_for_interface,
    is_martian,
};

use crate::frame::{Frame, read};

#[map(name = "HOST_ADDRESSES")]
static HOST_ADDRESSES: HashMap<HostAddress, u8> =
    HashMap::with_max_entries(HOST_ADDRESSES_CAPACITY, 0);

#[map(name = "HOST_ADDRESS_FILTER")]
static HOST_ADDRESS_FILTER: Array<HostFilter> = Array::with_max_entries(1, 0);

/// Where [`owns`] builds its lookup key, off the stack.
#[map(name = "HOST_KEY_SCRATCH")]
static HOST_KEY_SCRATCH: PerCpuArray<HostAddress> = PerCpuArray::with_max_entries(1, 0);

/// The frame was sent to the interface's own unicast MAC, `interface_mac` (as a protected
/// port's entry holds it).
#[inline(always)]
pub fn frame_for_interface(ctx: &impl Frame, interface_mac: &[u8; 6]) -> Result<(), Counter> {
    let destination: [u8; 6] = read(ctx, 0).ok_or(Counter::Truncated)?;
    if !is_for_interface(destination, interface_mac) {
        return Err(Counter::OtherMac);
    }
    Ok(())
}

/// Neither end is martian, and the server end is one of the host's own addresses.
#[inline(always)]
pub fn owns_destination(key: &FlowKey) -> Result<(), Counter> {
    if is_martian(key.family, &key.client_addr) || is_martian(key.family, &key.server_addr) {
        return Err(Counter::MartianAddress);
    }
    if !is_host_address(key.family, &key.server_addr) {
        return Err(Counter::NotHostAddress);
    }
    Ok(())
}

/// A segment whose source is one of the host's own addresses did not come from outside: Linux
/// drops it (`fib_validate_source` without `accept_local`), and answering it would make the host
/// talk to itself.
#[inline(always)]
pub fn source_is_foreign(key: &FlowKey) -> Result<(), Counter> {
    if is_host_address(key.family, &key.client_addr) {
        return Err(Counter::MartianAddress);
    }
    Ok(())
}

#[inline(always)]
fn is_host_address(family: u8, address: &[u8; 16]) -> bool {
    // Most addresses are ruled out here, without hashing them.
    if !HOST_ADDRESS_FILTER
        .get(0)
        .is_some_and(|filter| filter.may_hold(family, address))
    {
        return false;
    }
    let Some(slot) = HOST_KEY_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU slot, used only within this invocation. Its padding is never written,
    // so it stays the zero the map starts with.
    let lookup = unsafe {
        (*slot).address = *address;
        (*slot).family = family;
        &*slot
    };
    HOST_ADDRESSES.get_ptr(lookup).is_some()
}
