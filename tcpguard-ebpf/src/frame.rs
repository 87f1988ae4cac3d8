//! Bounds-checked access to packet memory, for XDP and TC alike. Every read or write goes
//! through [`at`], whose comparison against `data_end` is what the verifier needs to see.

use core::mem::size_of;

use aya_ebpf::programs::{TcContext, XdpContext};

/// A program context with direct packet access.
pub trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// Bytes in the whole packet. In TC this exceeds `end - start` when the packet is not
    /// linear: a GSO packet from the local TCP stack carries most of its payload in pages.
    fn packet_len(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }

    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.data_end() - self.data()
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }

    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }

    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.len() as usize
    }
}

/// A pointer to `T` at `offset` bytes into the frame, if all of `T` lies inside it.
#[inline(always)]
pub fn at<T>(ctx: &impl Frame, offset: usize) -> Option<*mut T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
pub fn read<const N: usize>(ctx: &impl Frame, offset: usize) -> Option<[u8; N]> {
    // SAFETY: `at` checked that N bytes at offset are inside the frame.
    at::<[u8; N]>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
pub fn be16_at(ctx: &impl Frame, offset: usize) -> Option<u16> {
    read::<2>(ctx, offset).map(u16::from_be_bytes)
}

#[inline(always)]
pub fn len(ctx: &impl Frame) -> usize {
    ctx.packet_len()
}
