//! The encoder: [`KeyWriter`] and the tags of the encoding.

use super::CacheKey;
use crate::keybuf::KeyBuf;

pub(super) mod tag {
    pub const U64: u8 = 1;
    pub const I64: u8 = 2;
    pub const U128: u8 = 3;
    pub const I128: u8 = 4;
    pub const FALSE: u8 = 5;
    pub const TRUE: u8 = 6;
    pub const CHAR: u8 = 7;
    pub const F32: u8 = 8;
    pub const F64: u8 = 9;
    pub const STR: u8 = 10;
    pub const UNIT: u8 = 11;
    pub const NONE: u8 = 12;
    pub const SOME: u8 = 13;
    pub const SEQ: u8 = 14;
    pub const TUPLE: u8 = 15;
    pub const SET: u8 = 16;
    pub const MAP: u8 = 17;
    pub const STRUCT: u8 = 18;
    pub const FIELD: u8 = 19;
    pub const TUPLE_STRUCT: u8 = 20;
    pub const UNIT_STRUCT: u8 = 21;
    pub const VARIANT: u8 = 22;
    pub const VARIANT_TUPLE: u8 = 23;
    pub const VARIANT_STRUCT: u8 = 24;
    pub const SKIPPED: u8 = 25;
    pub const END: u8 = 26;
    /// First byte of a function key: the key format version.
    pub const KEY_V1: u8 = 0xC1;
}

/// Encoder of a cache key. [`CacheKey`] implementations call its methods.
///
/// Every composite that is begun (`begin_*`) must be closed with [`KeyWriter::end`].
#[derive(Clone)]
pub struct KeyWriter {
    buf: KeyBuf,
}

impl Default for KeyWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyWriter {
    /// An empty writer, for encoding a single value (see [`key_text`](super::key_text)).
    #[inline(always)]
    pub fn new() -> Self {
        KeyWriter { buf: KeyBuf::new() }
    }

    #[inline(always)]
    pub(super) fn byte(&mut self, b: u8) {
        self.buf.push(b);
    }

    #[inline]
    fn len(&mut self, n: usize) {
        self.varint(n as u64);
    }

    /// LEB128: seven bits a byte, low first.
    #[inline(never)]
    fn varint(&mut self, mut n: u64) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                self.buf.push(b);
                return;
            }
            self.buf.push(b | 0x80);
        }
    }

    #[inline]
    fn raw_str(&mut self, s: &str) {
        self.len(s.len());
        self.buf.extend(s.as_bytes());
    }

    /// Writes `tag` and `n` as a varint; one capacity check when `n` takes one byte.
    #[inline(always)]
    fn tagged(&mut self, tag: u8, n: u64) {
        if n < 0x80 {
            self.buf.push2(tag, n as u8);
        } else {
            self.byte(tag);
            self.varint(n);
        }
    }

    /// Writes an unsigned integer (any width up to 64 bits).
    #[inline(always)]
    pub fn write_u64(&mut self, v: u64) {
        self.tagged(tag::U64, v);
    }
    /// Writes a signed integer (any width up to 64 bits).
    #[inline]
    pub fn write_i64(&mut self, v: i64) {
        // zigzag: small magnitudes of either sign take few bytes
        self.tagged(tag::I64, ((v << 1) ^ (v >> 63)) as u64);
    }
    /// Writes a `u128`.
    pub fn write_u128(&mut self, v: u128) {
        self.byte(tag::U128);
        self.buf.extend(&v.to_le_bytes());
    }
    /// Writes an `i128`.
    pub fn write_i128(&mut self, v: i128) {
        self.byte(tag::I128);
        self.buf.extend(&v.to_le_bytes());
    }
    /// Writes a `bool`.
    #[inline]
    pub fn write_bool(&mut self, v: bool) {
        self.byte(if v { tag::TRUE } else { tag::FALSE });
    }
    /// Writes a `char`.
    pub fn write_char(&mut self, v: char) {
        self.byte(tag::CHAR);
        self.buf.extend(&u32::from(v).to_le_bytes());
    }
    /// Writes an `f32` by its bits (`0.0` and `-0.0` differ, NaNs differ by payload).
    pub fn write_f32(&mut self, v: f32) {
        self.byte(tag::F32);
        self.buf.extend(&v.to_bits().to_le_bytes());
    }
    /// Writes an `f64` by its bits (`0.0` and `-0.0` differ, NaNs differ by payload).
    pub fn write_f64(&mut self, v: f64) {
        self.byte(tag::F64);
        self.buf.extend(&v.to_bits().to_le_bytes());
    }
    /// Writes a string.
    #[inline(always)]
    pub fn write_str(&mut self, v: &str) {
        self.tagged(tag::STR, v.len() as u64);
        self.buf.extend(v.as_bytes());
    }
    /// Writes `()`.
    pub fn write_unit(&mut self) {
        self.byte(tag::UNIT);
    }
    /// Writes `None`.
    pub fn write_none(&mut self) {
        self.byte(tag::NONE);
    }
    /// Begins `Some(..)`: exactly one value must follow, and no `end`.
    pub fn begin_some(&mut self) {
        self.byte(tag::SOME);
    }
    /// Begins a sequence (`[a,b]`).
    pub fn begin_seq(&mut self) {
        self.byte(tag::SEQ);
    }
    /// Begins a tuple (`(a,b)`).
    #[inline(always)]
    pub fn begin_tuple(&mut self) {
        self.byte(tag::TUPLE);
    }
    /// Begins a struct with named fields (`Name{a:1}`); each field is
    /// [`field`](Self::field) followed by its value.
    pub fn begin_struct(&mut self, name: &str) {
        self.byte(tag::STRUCT);
        self.raw_str(name);
    }
    /// Names the next field of a struct or struct variant.
    pub fn field(&mut self, name: &str) {
        self.byte(tag::FIELD);
        self.raw_str(name);
    }
    /// Begins a tuple struct (`Name(a,b)`).
    pub fn begin_tuple_struct(&mut self, name: &str) {
        self.byte(tag::TUPLE_STRUCT);
        self.raw_str(name);
    }
    /// Writes a unit struct (`Name`).
    pub fn write_unit_struct(&mut self, name: &str) {
        self.byte(tag::UNIT_STRUCT);
        self.raw_str(name);
    }
    /// Writes a unit enum variant (`Enum::Variant`).
    pub fn write_unit_variant(&mut self, enum_name: &str, variant: &str) {
        self.byte(tag::VARIANT);
        self.raw_str(enum_name);
        self.raw_str(variant);
    }
    /// Begins a tuple enum variant (`Enum::Variant(a,b)`).
    pub fn begin_tuple_variant(&mut self, enum_name: &str, variant: &str) {
        self.byte(tag::VARIANT_TUPLE);
        self.raw_str(enum_name);
        self.raw_str(variant);
    }
    /// Begins a struct enum variant (`Enum::Variant{a:1}`).
    pub fn begin_struct_variant(&mut self, enum_name: &str, variant: &str) {
        self.byte(tag::VARIANT_STRUCT);
        self.raw_str(enum_name);
        self.raw_str(variant);
    }
    /// Ends the innermost composite begun with a `begin_*` method (except `begin_some`).
    #[inline(always)]
    pub fn end(&mut self) {
        self.byte(tag::END);
    }

    /// Writes the items of a sequence and closes it.
    pub fn write_seq<'a, T: CacheKey + 'a + ?Sized>(
        &mut self,
        items: impl IntoIterator<Item = &'a T>,
    ) {
        self.begin_seq();
        for item in items {
            item.write_key(self);
        }
        self.end();
    }

    /// Writes an unordered collection: each element is encoded on its own, and the
    /// encodings are sorted, so iteration order does not matter.
    pub(super) fn write_unordered<I, F>(&mut self, tag: u8, items: I, mut write: F)
    where
        I: Iterator,
        F: FnMut(&mut KeyWriter, I::Item),
    {
        let mut encoded: Vec<Vec<u8>> = items
            .map(|item| {
                let mut w = KeyWriter::new();
                write(&mut w, item);
                w.buf.into_vec()
            })
            .collect();
        encoded.sort_unstable();
        self.byte(tag);
        for e in &encoded {
            self.buf.extend(e);
        }
        self.end();
    }

    /// Writes a value that was left out of the key (`skip(..)`), rendered as `*`.
    #[doc(hidden)]
    pub fn write_skipped(&mut self) {
        self.byte(tag::SKIPPED);
    }

    /// The encoded bytes so far.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_slice()
    }

    /// The in-process tier's hash of [`as_bytes`](Self::as_bytes), computed as they
    /// were written.
    #[inline(always)]
    pub(crate) fn key_hash(&self) -> u64 {
        self.buf.hash()
    }

    /// Writes the start of a cached function's key: the format version and the
    /// function's registration number.
    #[inline(always)]
    pub(super) fn begin_function(&mut self, id: u32) {
        self.tagged(tag::KEY_V1, u64::from(id));
    }

    /// Adds a generic type argument to a function key (before any argument).
    #[doc(hidden)]
    #[inline]
    pub fn type_arg(&mut self, type_name: &str) {
        self.byte(tag::STR);
        self.raw_str(type_name);
    }

    /// Marks the end of the type arguments and the start of the value arguments.
    #[doc(hidden)]
    #[inline(always)]
    pub fn begin_args(&mut self) {
        self.byte(tag::TUPLE);
    }
}
