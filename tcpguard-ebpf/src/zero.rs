//! Zeroing without `memset`. The bpf target has no builtins, so LLVM turns every `[0; N]`, every
//! `mem::zeroed()` and every run of plain zero stores into a call to compiler_builtins'
//! `memset`, which stores one byte per loop turn: four instructions a byte, some hundreds per
//! SYN. The stores here are volatile, which LLVM may not merge, and as wide as alignment allows.

use core::mem::MaybeUninit;

/// `T`, 8-byte aligned, so that it can be zeroed a word at a time: stack accesses must be
/// aligned to their width.
#[repr(C, align(8))]
pub struct Aligned<T>(pub T);

/// Zeroes `slot` one 8-byte word at a time and returns it initialised.
///
/// # Safety
///
/// All-zero bytes must be a valid `T` (plain old data: integers, arrays of them).
#[inline(always)]
pub unsafe fn zeroed_in<T>(slot: &mut MaybeUninit<Aligned<T>>) -> &mut T {
    let words = slot.as_mut_ptr().cast::<u64>();
    let mut word = 0;
    while word < size_of::<Aligned<T>>() / 8 {
        // SAFETY: Aligned<T> is 8-byte aligned and a whole number of words long.
        unsafe { words.add(word).write_volatile(0) };
        word += 1;
    }
    // SAFETY: every byte is written, and T is valid all-zero (the caller's promise).
    unsafe { &mut slot.assume_init_mut().0 }
}

/// Zeroes `bytes` one byte at a time, for memory of unknown alignment (map values).
#[inline(always)]
pub fn clear(bytes: &mut [u8]) {
    for byte in bytes {
        // SAFETY: a valid, exclusive reference.
        unsafe { core::ptr::write_volatile(byte, 0) };
    }
}

/// Zeroes `bytes` four at a time.
///
/// # Safety
///
/// `bytes` must start 4-byte aligned and be a multiple of 4 long: a slice of a buffer that
/// [`Aligned`] holds, at offsets that keep it so.
#[inline(always)]
pub unsafe fn clear_words(bytes: &mut [u8]) {
    let words = bytes.as_mut_ptr().cast::<u32>();
    let mut word = 0;
    while word < bytes.len() / 4 {
        // SAFETY: inside `bytes`, aligned as the caller promises (and the verifier rejects a
        // misaligned stack store, so a broken promise fails the load, not the packet).
        unsafe { words.add(word).write_volatile(0) };
        word += 1;
    }
}
