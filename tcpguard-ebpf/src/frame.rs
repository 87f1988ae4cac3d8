//! Bounds-checked access to the frame in an `XdpContext`. Every read or write of packet memory
//! goes through [`at`], whose comparison against `data_end` is what the verifier needs to see.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// A pointer to `T` at `offset` bytes into the frame, if all of `T` lies inside it.
#[inline(always)]
pub fn at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
pub fn read<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    // SAFETY: `at` checked that N bytes at offset are inside the frame.
    at::<[u8; N]>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
pub fn be16_at(ctx: &XdpContext, offset: usize) -> Option<u16> {
    read::<2>(ctx, offset).map(u16::from_be_bytes)
}

#[inline(always)]
pub fn len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}
