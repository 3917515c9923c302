//! The byte buffer a key is written into: on the stack up to [`INLINE`] bytes, so
//! that building the key of a hit touches no heap and no thread-local; a longer key
//! moves to a heap buffer borrowed from the thread (and given back when the writer is
//! dropped), so long keys do not allocate once that buffer has grown.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::ptr;

/// Bytes held on the stack before the buffer moves to the heap.
const INLINE: usize = 192;

/// `len` once the bytes are in `heap`: larger than [`INLINE`] by more than any slice
/// is long, so the inline check fails without a second test.
const SPILLED: usize = usize::MAX / 2 + 1;

thread_local! {
    /// The heap buffer of long keys, reused by the thread's next long key.
    static SPILL: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

pub(crate) struct KeyBuf {
    /// Bytes written to `inline`, or [`SPILLED`].
    len: usize,
    inline: [MaybeUninit<u8>; INLINE],
    heap: Vec<u8>,
}

impl KeyBuf {
    #[inline(always)]
    pub(crate) const fn new() -> Self {
        KeyBuf {
            len: 0,
            inline: [MaybeUninit::uninit(); INLINE],
            heap: Vec::new(),
        }
    }

    #[inline(always)]
    pub(crate) fn push(&mut self, b: u8) {
        let len = self.len;
        if len < INLINE {
            self.inline[len] = MaybeUninit::new(b);
            self.len = len + 1;
        } else {
            self.extend_heap(&[b]);
        }
    }

    #[inline(always)]
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        let (len, n) = (self.len, bytes.len());
        if len + n <= INLINE {
            // SAFETY: `len + n <= INLINE`, so the destination is inside `inline`; the
            // source is a live slice of `n` bytes that cannot overlap `self`.
            unsafe { copy_short(bytes.as_ptr(), self.inline.as_mut_ptr().add(len).cast(), n) };
            self.len = len + n;
        } else {
            self.extend_heap(bytes);
        }
    }

    /// Appends in the heap buffer, moving there first if the bytes are still inline.
    #[cold]
    #[inline(never)]
    fn extend_heap(&mut self, bytes: &[u8]) {
        if self.len != SPILLED {
            let mut heap = SPILL.try_with(Cell::take).unwrap_or_default();
            heap.clear();
            heap.reserve(2 * INLINE + bytes.len());
            heap.extend_from_slice(self.as_slice());
            self.heap = heap;
            self.len = SPILLED;
        }
        self.heap.extend_from_slice(bytes);
    }

    #[inline(always)]
    pub(crate) fn as_slice(&self) -> &[u8] {
        let len = self.len;
        if len <= INLINE {
            // SAFETY: the first `len` bytes of `inline` were written.
            unsafe { std::slice::from_raw_parts(self.inline.as_ptr().cast(), len) }
        } else {
            &self.heap
        }
    }

    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.as_slice().to_vec()
    }
}

impl Clone for KeyBuf {
    fn clone(&self) -> Self {
        let mut copy = KeyBuf::new();
        copy.extend(self.as_slice());
        copy
    }
}

impl Drop for KeyBuf {
    #[inline(always)]
    fn drop(&mut self) {
        if self.heap.capacity() != 0 {
            give_back(std::mem::take(&mut self.heap));
        }
    }
}

#[cold]
fn give_back(heap: Vec<u8>) {
    let _ = SPILL.try_with(|s| s.set(heap));
}

/// Copies `n` bytes; short copies without a call to `memcpy` (two overlapping loads
/// and stores of the widest word that fits).
///
/// # Safety
/// `src` is readable and `dst` writable for `n` bytes, and they do not overlap.
#[inline(always)]
unsafe fn copy_short(src: *const u8, dst: *mut u8, n: usize) {
    unsafe {
        match n {
            0 => {}
            1..=3 => {
                *dst = *src;
                *dst.add(n / 2) = *src.add(n / 2);
                *dst.add(n - 1) = *src.add(n - 1);
            }
            4..=7 => {
                let (a, b) = (
                    ptr::read_unaligned(src.cast::<u32>()),
                    ptr::read_unaligned(src.add(n - 4).cast::<u32>()),
                );
                ptr::write_unaligned(dst.cast::<u32>(), a);
                ptr::write_unaligned(dst.add(n - 4).cast::<u32>(), b);
            }
            8..=16 => {
                let (a, b) = (
                    ptr::read_unaligned(src.cast::<u64>()),
                    ptr::read_unaligned(src.add(n - 8).cast::<u64>()),
                );
                ptr::write_unaligned(dst.cast::<u64>(), a);
                ptr::write_unaligned(dst.add(n - 8).cast::<u64>(), b);
            }
            _ => ptr::copy_nonoverlapping(src, dst, n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_length_reads_back_inline_and_spilled() {
        let source: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for n in 0..40 {
            let mut b = KeyBuf::new();
            let mut expected = Vec::new();
            let mut at = 0;
            // Writes of `n` bytes until the buffer has spilled, checking every step.
            while expected.len() < 2 * INLINE + 50 {
                let part = &source[at % 500..at % 500 + n];
                b.extend(part);
                b.push(0xEE);
                expected.extend_from_slice(part);
                expected.push(0xEE);
                assert_eq!(b.as_slice(), &expected[..], "n = {n}");
                at += 7;
            }
            assert_eq!(b.clone().into_vec(), expected);
        }
    }

    #[test]
    fn a_spilled_buffer_is_reused_by_the_next_long_key() {
        let long = vec![7u8; 3 * INLINE];
        let mut b = KeyBuf::new();
        b.extend(&long);
        let first = b.as_slice().as_ptr();
        drop(b);
        let mut c = KeyBuf::new();
        c.extend(&long);
        assert_eq!(c.as_slice().as_ptr(), first);
        assert_eq!(c.as_slice(), &long[..]);
    }
}
