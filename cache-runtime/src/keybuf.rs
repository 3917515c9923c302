//! The byte buffer a key is written into: on the stack up to [`INLINE`] bytes, so
//! that building the key of a hit touches no heap and no thread-local; a longer key
//! moves to a heap buffer borrowed from the thread (and given back when the writer is
//! dropped), so long keys do not allocate once that buffer has grown.
//!
//! The buffer also hashes what is written, as it is written ([`key_hash`] of the
//! bytes). Hashing the bytes after writing them would read back, in words, bytes
//! that were just stored one or two at a time, and such a load waits until the
//! stores reach the cache (the processor cannot forward them): a stall of about 5 ns
//! on every hit, more than the rest of the key costs.

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

/// The hash of a key's bytes, as the in-process tier files it: the bytes as
/// little-endian words (the last one padded with zeros), each folded into a state
/// that starts from a random seed of the process, then the length.
pub(crate) fn key_hash(bytes: &[u8]) -> u64 {
    let mut h = seed();
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h = fold(h ^ u64::from_le_bytes(w.try_into().unwrap_or_default()));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        h = fold(h ^ u64::from_le_bytes(last));
    }
    finish(h, bytes.len())
}

/// One multiplication, folded: both halves of the 128-bit product, so every bit of
/// the input reaches the high and the low bits (the shard and the table slot).
#[inline(always)]
fn fold(x: u64) -> u64 {
    const K: u64 = 0x243f_6a88_85a3_08d3;
    let full = u128::from(x) * u128::from(K);
    (full as u64) ^ ((full >> 64) as u64)
}

#[inline(always)]
fn finish(h: u64, len: usize) -> u64 {
    fold(fold(h ^ len as u64) ^ 0x9e37_79b9_7f4a_7c15)
}

static SEED: AtomicU64 = AtomicU64::new(0);

/// The process's seed, so that which keys collide cannot be known outside it.
#[inline(always)]
fn seed() -> u64 {
    match SEED.load(Ordering::Relaxed) {
        0 => init_seed(),
        s => s,
    }
}

#[cold]
fn init_seed() -> u64 {
    use std::hash::BuildHasher;
    let s = std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64) | 1;
    match SEED.compare_exchange(0, s, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => s,
        Err(other) => other,
    }
}

/// The bytes of `s` (1 to 8 of them) as a little-endian word, zero above them.
#[inline(always)]
fn short_word(s: &[u8]) -> u64 {
    let n = s.len();
    let at = |i: usize| u64::from(s[i]);
    match n {
        1..=3 => at(0) | at(n / 2) << (8 * (n / 2)) | at(n - 1) << (8 * (n - 1)),
        4..=7 => {
            let lo = u32::from_le_bytes(s[..4].try_into().unwrap_or_default());
            let hi = u32::from_le_bytes(s[n - 4..].try_into().unwrap_or_default());
            u64::from(lo) | u64::from(hi) << (8 * (n - 4))
        }
        _ => u64::from_le_bytes(s[..8].try_into().unwrap_or_default()),
    }
}

/// Bytes held on the stack before the buffer moves to the heap.
const INLINE: usize = 192;

thread_local! {
    /// The heap buffer of long keys, reused by the thread's next long key.
    static SPILL: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// The bytes are in `inline` while `len <= INLINE`: a write that would pass
/// [`INLINE`] moves them to `heap`, where every later write goes.
pub(crate) struct KeyBuf {
    /// Bytes written.
    len: usize,
    /// The hash of the complete words written so far (see [`key_hash`]).
    hash: u64,
    /// The bytes of the word being filled (`len % 8` of them), little-endian.
    pending: u64,
    inline: [MaybeUninit<u8>; INLINE],
    heap: Vec<u8>,
}

impl KeyBuf {
    #[inline(always)]
    pub(crate) fn new() -> Self {
        KeyBuf {
            len: 0,
            hash: seed(),
            pending: 0,
            inline: [MaybeUninit::uninit(); INLINE],
            heap: Vec::new(),
        }
    }

    /// [`key_hash`] of the bytes written.
    #[inline(always)]
    pub(crate) fn hash(&self) -> u64 {
        let h = match self.len % 8 {
            0 => self.hash,
            _ => fold(self.hash ^ self.pending),
        };
        finish(h, self.len)
    }

    /// Hashes `k` bytes (1 to 8), given as the little-endian word `v`, written at
    /// `at` (the length before them).
    #[inline(always)]
    fn feed(&mut self, at: usize, v: u64, k: usize) {
        let fill = at % 8;
        let word = self.pending | v << (8 * fill);
        if fill + k >= 8 {
            self.hash = fold(self.hash ^ word);
            self.pending = match fill {
                0 => 0,
                _ => v >> (8 * (8 - fill)),
            };
        } else {
            self.pending = word;
        }
    }

    #[inline(always)]
    fn feed_slice(&mut self, at: usize, s: &[u8]) {
        match s.len() {
            0 => {}
            n @ 1..=8 => self.feed(at, short_word(s), n),
            _ => self.feed_long(at, s),
        }
    }

    #[inline(never)]
    fn feed_long(&mut self, mut at: usize, s: &[u8]) {
        let mut words = s.chunks_exact(8);
        for w in &mut words {
            self.feed(at, u64::from_le_bytes(w.try_into().unwrap_or_default()), 8);
            at += 8;
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            self.feed(at, short_word(rest), rest.len());
        }
    }

    #[inline(always)]
    pub(crate) fn push(&mut self, b: u8) {
        let len = self.len;
        self.feed(len, u64::from(b), 1);
        if len < INLINE {
            self.inline[len] = MaybeUninit::new(b);
        } else {
            self.extend_heap(&[b]);
        }
        self.len = len + 1;
    }

    /// Appends two bytes.
    #[inline(always)]
    pub(crate) fn push2(&mut self, a: u8, b: u8) {
        let len = self.len;
        self.feed(len, u64::from(a) | u64::from(b) << 8, 2);
        if len + 2 <= INLINE {
            self.inline[len] = MaybeUninit::new(a);
            self.inline[len + 1] = MaybeUninit::new(b);
        } else {
            self.extend_heap(&[a, b]);
        }
        self.len = len + 2;
    }

    #[inline(always)]
    pub(crate) fn extend(&mut self, bytes: &[u8]) {
        let (len, n) = (self.len, bytes.len());
        self.feed_slice(len, bytes);
        if len + n <= INLINE {
            // SAFETY: `len + n <= INLINE`, so the destination is inside `inline`; the
            // source is a live slice of `n` bytes that cannot overlap `self`.
            unsafe { copy_short(bytes.as_ptr(), self.inline.as_mut_ptr().add(len).cast(), n) };
        } else {
            self.extend_heap(bytes);
        }
        self.len = len + n;
    }

    /// Appends in the heap buffer (`len` not yet counting `bytes`), moving there first
    /// if the bytes are still inline.
    #[cold]
    #[inline(never)]
    fn extend_heap(&mut self, bytes: &[u8]) {
        if self.len <= INLINE {
            let mut heap = SPILL.try_with(Cell::take).unwrap_or_default();
            heap.clear();
            heap.reserve(2 * INLINE + bytes.len());
            heap.extend_from_slice(self.as_slice());
            self.heap = heap;
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
/// and stores of the widest word that fits). Storing each short write as one 8-byte
/// word instead (with room past the buffer) took fewer instructions (791 against 808
/// a hit) but slowed the plain `fn` hit from about 46 to 53 ns: the key's comparison
/// then reads words that span several overlapping stores.
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

    /// The hash computed while writing equals the hash of the bytes written, whatever
    /// the sizes of the writes and wherever the words' boundaries fall, spilled or not.
    #[test]
    fn the_hash_while_writing_is_the_hash_of_the_bytes() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let source: Vec<u8> = (0..600).map(|_| next() as u8).collect();
        let mut keys = std::collections::HashSet::new();
        let mut hashes = std::collections::HashSet::new();
        for _ in 0..5_000 {
            let mut b = KeyBuf::new();
            assert_eq!(b.hash(), key_hash(&[]));
            let writes = next() % 40;
            for _ in 0..writes {
                match next() % 4 {
                    0 => b.push(next() as u8),
                    1 => b.push2(next() as u8, next() as u8),
                    2 => {
                        let n = (next() % 20) as usize;
                        let at = (next() % 500) as usize;
                        b.extend(&source[at..at + n]);
                    }
                    _ => {
                        let n = (next() % 90) as usize;
                        let at = (next() % 500) as usize;
                        b.extend(&source[at..at + n]);
                    }
                }
                assert_eq!(b.hash(), key_hash(b.as_slice()));
            }
            keys.insert(b.as_slice().to_vec());
            hashes.insert(b.hash());
        }
        assert_eq!(hashes.len(), keys.len(), "no two keys share a hash");
    }

    #[test]
    fn keys_that_differ_by_trailing_zeros_hash_apart() {
        assert_ne!(key_hash(b"ab"), key_hash(b"ab\0"));
        assert_ne!(key_hash(&[0; 8]), key_hash(&[0; 16]));
        assert_ne!(key_hash(&[]), key_hash(&[0]));
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
