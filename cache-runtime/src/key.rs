//! Cache keys: the [`CacheKey`] trait, its encoder [`KeyWriter`], and the readable form.
//!
//! A key is built once per call, as compact self-describing bytes: a tag before every
//! value, a length before every string. Those bytes are what the in-process tier
//! hashes and compares, so a hit never formats text. The readable form
//! (`catalog::get_product:v1(42,"blue")`), used for Redis, logs and inspection, is
//! rendered from the bytes only when it is needed.
//!
//! Invariants kept here:
//! - the encoding is injective: the tags and length prefixes make two different
//!   argument lists produce different bytes;
//! - the rendering is injective for a given function: strings and chars are quoted and
//!   escaped, every composite is delimited, NaN floats render with their bits;
//! - both are identical across processes, machines and runs: integers are
//!   LEB128 varints (`usize` as `u64`, signed ones zigzagged), floats go by bits, and unordered collections
//!   (`HashMap`, `HashSet`) are sorted by their encoded entries.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::hash::BuildHasher;
use std::rc::Rc;
use std::sync::Arc;

use std::cell::Cell;

use crate::keybuf::KeyBuf;
use crate::registry::{registration_by_id, Registration};

/// A value that can be part of a cache key.
///
/// Implemented for integers, `bool`, `char`, floats (by bits), `String`, `str`,
/// `Cow<str>`, `Option`, `Vec`, slices, arrays, tuples, `BTreeMap`, `BTreeSet`,
/// `HashMap`/`HashSet` (order-independent), `Box`/`Arc`/`Rc`/`&T`, and by
/// `#[derive(CacheKey)]` for structs and enums:
///
/// ```
/// use cache_runtime::CacheKey;
///
/// #[derive(CacheKey)]
/// struct Page { number: u32, size: u32 }
///
/// #[derive(CacheKey)]
/// enum Sort { ByName, ByPrice { descending: bool } }
///
/// assert_eq!(cache_runtime::key_text(&Page { number: 2, size: 50 }), "Page{number:2,size:50}");
/// assert_eq!(cache_runtime::key_text(&Sort::ByPrice { descending: true }), "Sort::ByPrice{descending:true}");
/// ```
///
/// A hand-written implementation must write the same values for equal inputs and
/// different values for different inputs, using the structured methods of
/// [`KeyWriter`] so that the key stays injective.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be part of a cache key: it does not implement `CacheKey`",
    label = "this is part of the cache key",
    note = "derive it with `#[derive(cache_runtime::CacheKey)]` on `{Self}`, or leave this parameter out of the key with `#[cached(skip(...))]` (`skip(self)` for the receiver)"
)]
pub trait CacheKey {
    /// Writes this value into the key.
    fn write_key(&self, w: &mut KeyWriter);
}

mod tag {
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
    /// An empty writer, for encoding a single value (see [`key_text`]).
    #[inline(always)]
    pub fn new() -> Self {
        KeyWriter { buf: KeyBuf::new() }
    }

    #[inline(always)]
    fn byte(&mut self, b: u8) {
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
    fn write_unordered<I, F>(&mut self, tag: u8, items: I, mut write: F)
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
    fn begin_function(&mut self, id: u32) {
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

thread_local! {
    /// Where [`Key::with_text`] renders.
    static TEXT_BUFFER: Cell<String> = const { Cell::new(String::new()) };
}

/// Builds a function key in a buffer on the stack (see [`KeyBuf`]) and runs `f` on
/// it.
///
/// The key is the function's registration number, then for methods the receiver's
/// type name, then `write_args`: the type arguments (with [`KeyWriter::type_arg`]),
/// [`KeyWriter::begin_args`], and the arguments.
#[inline]
pub(crate) fn with_function_key<R>(
    reg: &Registration,
    self_type: Option<&str>,
    write_args: impl FnOnce(&mut KeyWriter),
    f: impl FnOnce(KeyRef<'_>) -> R,
) -> R {
    let mut w = KeyWriter::new();
    write_function_key(&mut w, reg, self_type, write_args);
    f(KeyRef(w.as_bytes()))
}

/// Writes a function key into `w` (empty): see [`with_function_key`].
#[inline(always)]
pub(crate) fn write_function_key(
    w: &mut KeyWriter,
    reg: &Registration,
    self_type: Option<&str>,
    write_args: impl FnOnce(&mut KeyWriter),
) {
    w.begin_function(reg.id);
    if let (true, Some(ty)) = (reg.method, self_type) {
        w.type_arg(ty);
    }
    write_args(w);
    w.end();
}

/// A function key being looked up, borrowed from the key buffer.
#[derive(Clone, Copy)]
pub(crate) struct KeyRef<'a>(pub(crate) &'a [u8]);

impl<'a> KeyRef<'a> {
    #[inline]
    pub(crate) fn as_bytes(self) -> &'a [u8] {
        self.0
    }
    pub(crate) fn to_owned(self) -> Key {
        Key {
            bytes: self.0.into(),
        }
    }
}

impl fmt::Display for KeyRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        render_key(self.0, f)
    }
}

/// The key of one call of a cached function, in its compact encoded form.
///
/// `Display` renders the readable form, for example `shop::get_product:v1(42)`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Key {
    bytes: Arc<[u8]>,
}

impl Key {
    /// The encoded bytes: what the in-process tier hashes and compares.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The encoded bytes, shared (a call's single flight holds them too).
    #[inline]
    pub(crate) fn shared(&self) -> &Arc<[u8]> {
        &self.bytes
    }

    /// Rebuilds a key from bytes produced by [`Key::as_bytes`]. Returns `None` for
    /// bytes that are not a well-formed key.
    pub fn from_bytes(bytes: &[u8]) -> Option<Key> {
        parse_header(bytes)?;
        Some(Key {
            bytes: bytes.into(),
        })
    }

    fn parse_header(&self) -> Option<(Header<'_>, &[u8])> {
        parse_header(&self.bytes)
    }

    /// The readable form, with keys longer than `max_len` bytes shortened: the function
    /// part stays readable and the rest is replaced by a 128-bit hash of the whole
    /// readable key, as in `shop::search:v1#5f0c…` (32 hex digits).
    pub fn to_text(&self, max_len: usize) -> String {
        let mut out = String::with_capacity((2 * self.bytes.len() + 32).min(max_len));
        self.write_text(max_len, &mut out);
        out
    }

    /// Runs `f` on the readable form ([`Key::to_text`]), rendered into a buffer the
    /// thread reuses, so that reading a remote tier allocates no string for the key.
    pub(crate) fn with_text<R>(&self, max_len: usize, f: impl FnOnce(&str) -> R) -> R {
        let mut text = TEXT_BUFFER.with(Cell::take);
        text.clear();
        self.write_text(max_len, &mut text);
        let r = f(&text);
        TEXT_BUFFER.with(|b| b.set(text));
        r
    }

    /// Appends the readable form ([`Key::to_text`]) to `out`.
    fn write_text(&self, max_len: usize, out: &mut String) {
        let start = out.len();
        if render_key(&self.bytes, out).is_err() {
            out.truncate(start);
            out.push_str(INVALID_KEY);
        }
        if out.len() - start <= max_len {
            return;
        }
        let hash = xxhash_rust::xxh3::xxh3_128(&out.as_bytes()[start..]);
        out.truncate(start);
        match self.parse_header() {
            Some((header, _)) => {
                let _ = header.render(out);
            }
            None => out.push('?'),
        }
        let _ = write!(out, "#{hash:032x}");
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        render_key(&self.bytes, f)
    }
}

/// The registration number of the function an in-process key belongs to.
pub(crate) fn function_id(bytes: &[u8]) -> Option<u32> {
    let mut r = Reader { bytes };
    if r.byte()? != tag::KEY_V1 {
        return None;
    }
    u32::try_from(r.varint()?).ok()
}

/// The function part of a key (`name::<types>:vN`) and the bytes of its arguments.
fn parse_header(bytes: &[u8]) -> Option<(Header<'_>, &[u8])> {
    let mut r = Reader { bytes };
    if r.byte()? != tag::KEY_V1 {
        return None;
    }
    let reg = registration_by_id(u32::try_from(r.varint()?).ok()?)?;
    let mut types = Vec::new();
    loop {
        match r.byte()? {
            tag::STR => types.push(r.str()?),
            tag::TUPLE => break,
            _ => return None,
        }
    }
    let receiver = match reg.method {
        true if types.is_empty() => return None,
        true => Some(types.remove(0)),
        false => None,
    };
    Some((
        Header {
            receiver,
            name: reg.key_name,
            version: reg.version,
            types,
        },
        r.bytes,
    ))
}

const INVALID_KEY: &str = "<invalid key>";

/// Writes the readable form of a key: its function part, then its arguments.
fn render_key<W: fmt::Write + ?Sized>(bytes: &[u8], f: &mut W) -> fmt::Result {
    // A function that is not generic nor a method: its part is rendered already.
    let mut r = Reader { bytes };
    if let (Some(tag::KEY_V1), Some(id)) = (r.byte(), r.varint()) {
        let reg = u32::try_from(id).ok().and_then(registration_by_id);
        if let (Some(header), Some(tag::TUPLE)) = (reg.and_then(|r| r.header.as_deref()), r.byte())
        {
            f.write_str(header)?;
            f.write_str("(")?;
            render_items(&mut r, f, ",", false)?;
            return f.write_str(")");
        }
    }
    match parse_header(bytes) {
        Some((header, rest)) => {
            header.render(f)?;
            f.write_str("(")?;
            let mut r = Reader { bytes: rest };
            render_items(&mut r, f, ",", false)?;
            f.write_str(")")
        }
        None => f.write_str(INVALID_KEY),
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

struct Header<'a> {
    receiver: Option<&'a str>,
    name: &'a str,
    version: u32,
    types: Vec<&'a str>,
}

impl fmt::Display for Header<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.render(f)
    }
}

impl Header<'_> {
    fn render<W: fmt::Write + ?Sized>(&self, f: &mut W) -> fmt::Result {
        if let Some(receiver) = self.receiver {
            f.write_str(receiver)?;
            f.write_str("::")?;
        }
        f.write_str(self.name)?;
        if !self.types.is_empty() {
            f.write_str("::<")?;
            for (i, t) in self.types.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                f.write_str(t)?;
            }
            f.write_str(">")?;
        }
        f.write_str(":v")?;
        write_u64(f, u64::from(self.version))
    }
}

/// Writes `n` in decimal (without the formatting machinery: keys are rendered on
/// every read of a remote tier).
fn write_u64<W: fmt::Write + ?Sized>(f: &mut W, mut n: u64) -> fmt::Result {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf[i..]
        .iter()
        .try_for_each(|&d| f.write_char(char::from(d)))
}

/// Renders one value's key in the readable form, as it appears in a function key.
///
/// ```
/// assert_eq!(cache_runtime::key_text(&(42u64, "a \"quoted\" word")), r#"(42,"a \"quoted\" word")"#);
/// assert_eq!(cache_runtime::key_text(&vec![Some(1u8), None]), "[Some(1),None]");
/// ```
pub fn key_text<T: CacheKey + ?Sized>(value: &T) -> String {
    let mut w = KeyWriter::new();
    value.write_key(&mut w);
    let mut out = String::new();
    let mut r = Reader {
        bytes: w.as_bytes(),
    };
    if render_value(&mut r, &mut out).is_err() {
        return "<invalid key>".to_owned();
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(b)
    }
    fn peek(&self) -> Option<u8> {
        self.bytes.first().copied()
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn len(&mut self) -> Option<usize> {
        usize::try_from(self.varint()?).ok()
    }
    fn varint(&mut self) -> Option<u64> {
        let mut n: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }
    fn str(&mut self) -> Option<&'a str> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?).ok()
    }
}

fn bad() -> fmt::Error {
    fmt::Error
}

/// Renders values until the closing `END` (consumed), separated by `sep`.
/// With `fields`, each value is preceded by `FIELD name` and rendered `name:value`.
fn render_items<W: fmt::Write + ?Sized>(
    r: &mut Reader<'_>,
    f: &mut W,
    sep: &str,
    fields: bool,
) -> fmt::Result {
    let mut first = true;
    loop {
        if r.peek().ok_or_else(bad)? == tag::END {
            r.byte();
            return Ok(());
        }
        if !first {
            f.write_str(sep)?;
        }
        first = false;
        if fields {
            if r.byte() != Some(tag::FIELD) {
                return Err(bad());
            }
            f.write_str(r.str().ok_or_else(bad)?)?;
            f.write_str(":")?;
        }
        render_value(r, f)?;
    }
}

fn render_value<W: fmt::Write + ?Sized>(r: &mut Reader<'_>, f: &mut W) -> fmt::Result {
    let t = r.byte().ok_or_else(bad)?;
    match t {
        tag::U64 => write_u64(f, r.varint().ok_or_else(bad)?),
        tag::I64 => {
            let z = r.varint().ok_or_else(bad)?;
            let v = (z >> 1) as i64 ^ -((z & 1) as i64);
            if v < 0 {
                f.write_str("-")?;
            }
            write_u64(f, v.unsigned_abs())
        }
        tag::U128 => write!(f, "{}", u128::from_le_bytes(r.array().ok_or_else(bad)?)),
        tag::I128 => write!(f, "{}", i128::from_le_bytes(r.array().ok_or_else(bad)?)),
        tag::FALSE => f.write_str("false"),
        tag::TRUE => f.write_str("true"),
        tag::CHAR => {
            let c =
                char::from_u32(u32::from_le_bytes(r.array().ok_or_else(bad)?)).ok_or_else(bad)?;
            f.write_char('\'')?;
            escape(f, c, '\'')?;
            f.write_char('\'')
        }
        tag::F32 => {
            let v = f32::from_bits(u32::from_le_bytes(r.array().ok_or_else(bad)?));
            if v.is_nan() {
                write!(f, "NaN:{:#x}", v.to_bits())
            } else {
                write!(f, "{v:?}")
            }
        }
        tag::F64 => {
            let v = f64::from_bits(u64::from_le_bytes(r.array().ok_or_else(bad)?));
            if v.is_nan() {
                write!(f, "NaN:{:#x}", v.to_bits())
            } else {
                write!(f, "{v:?}")
            }
        }
        tag::STR => {
            let n = r.len().ok_or_else(bad)?;
            let bytes = r.take(n).ok_or_else(bad)?;
            f.write_char('"')?;
            // Short printable ASCII without quotes or backslashes, the usual string
            // argument: written a byte at a time, which for a few bytes costs less
            // than validating and copying them as a whole.
            if n <= 32
                && bytes
                    .iter()
                    .all(|&b| matches!(b, b' ' | b'!' | b'#'..=b'[' | b']'..=b'~'))
            {
                for &b in bytes {
                    f.write_char(char::from(b))?;
                }
                return f.write_char('"');
            }
            let s = std::str::from_utf8(bytes).map_err(|_| bad())?;
            // runs of characters that need no escape are written whole
            let mut run = 0;
            for (i, c) in s.char_indices() {
                if needs_escape(c, '"') {
                    f.write_str(&s[run..i])?;
                    escape(f, c, '"')?;
                    run = i + c.len_utf8();
                }
            }
            f.write_str(&s[run..])?;
            f.write_char('"')
        }
        tag::UNIT => f.write_str("()"),
        tag::NONE => f.write_str("None"),
        tag::SOME => {
            f.write_str("Some(")?;
            render_value(r, f)?;
            f.write_str(")")
        }
        tag::SKIPPED => f.write_str("*"),
        tag::SEQ => {
            f.write_str("[")?;
            render_items(r, f, ",", false)?;
            f.write_str("]")
        }
        tag::TUPLE => {
            f.write_str("(")?;
            render_items(r, f, ",", false)?;
            f.write_str(")")
        }
        tag::SET => {
            f.write_str("{")?;
            render_items(r, f, ",", false)?;
            f.write_str("}")
        }
        tag::MAP => {
            f.write_str("{")?;
            let mut first = true;
            loop {
                if r.peek().ok_or_else(bad)? == tag::END {
                    r.byte();
                    break;
                }
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                render_value(r, f)?;
                f.write_str(":")?;
                render_value(r, f)?;
            }
            f.write_str("}")
        }
        tag::STRUCT => {
            f.write_str(r.str().ok_or_else(bad)?)?;
            f.write_str("{")?;
            render_items(r, f, ",", true)?;
            f.write_str("}")
        }
        tag::TUPLE_STRUCT => {
            f.write_str(r.str().ok_or_else(bad)?)?;
            f.write_str("(")?;
            render_items(r, f, ",", false)?;
            f.write_str(")")
        }
        tag::UNIT_STRUCT => f.write_str(r.str().ok_or_else(bad)?),
        tag::VARIANT | tag::VARIANT_TUPLE | tag::VARIANT_STRUCT => {
            f.write_str(r.str().ok_or_else(bad)?)?;
            f.write_str("::")?;
            f.write_str(r.str().ok_or_else(bad)?)?;
            match t {
                tag::VARIANT_TUPLE => {
                    f.write_str("(")?;
                    render_items(r, f, ",", false)?;
                    f.write_str(")")
                }
                tag::VARIANT_STRUCT => {
                    f.write_str("{")?;
                    render_items(r, f, ",", true)?;
                    f.write_str("}")
                }
                _ => Ok(()),
            }
        }
        _ => Err(bad()),
    }
}

/// Whether [`escape`] writes `c` otherwise than as itself.
fn needs_escape(c: char, quote: char) -> bool {
    c == quote || c == '\\' || c.is_control()
}

/// Writes `c` as it appears inside a quoted string or char literal.
fn escape<W: fmt::Write + ?Sized>(f: &mut W, c: char, quote: char) -> fmt::Result {
    match c {
        '\\' => f.write_str("\\\\"),
        '\n' => f.write_str("\\n"),
        '\r' => f.write_str("\\r"),
        '\t' => f.write_str("\\t"),
        c if c == quote => {
            f.write_char('\\')?;
            f.write_char(c)
        }
        c if c.is_control() => write!(f, "\\u{{{:x}}}", u32::from(c)),
        c => f.write_char(c),
    }
}

// ---------------------------------------------------------------------------------
// Implementations for standard types.

macro_rules! unsigned {
    ($($t:ty),*) => {$(
        impl CacheKey for $t {
            #[inline]
            fn write_key(&self, w: &mut KeyWriter) { w.write_u64(*self as u64) }
        }
    )*};
}
macro_rules! signed {
    ($($t:ty),*) => {$(
        impl CacheKey for $t {
            #[inline]
            fn write_key(&self, w: &mut KeyWriter) { w.write_i64(*self as i64) }
        }
    )*};
}
unsigned!(u8, u16, u32, u64, usize);
signed!(i8, i16, i32, i64, isize);

impl CacheKey for u128 {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_u128(*self)
    }
}
impl CacheKey for i128 {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_i128(*self)
    }
}
impl CacheKey for bool {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_bool(*self)
    }
}
impl CacheKey for char {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_char(*self)
    }
}
impl CacheKey for f32 {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_f32(*self)
    }
}
impl CacheKey for f64 {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_f64(*self)
    }
}
impl CacheKey for str {
    #[inline]
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_str(self)
    }
}
impl CacheKey for String {
    #[inline]
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_str(self)
    }
}
impl CacheKey for Cow<'_, str> {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_str(self)
    }
}
impl CacheKey for () {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_unit()
    }
}

impl<T: CacheKey> CacheKey for Option<T> {
    fn write_key(&self, w: &mut KeyWriter) {
        match self {
            None => w.write_none(),
            Some(v) => {
                w.begin_some();
                v.write_key(w);
            }
        }
    }
}

impl<T: CacheKey> CacheKey for [T] {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_seq(self)
    }
}
impl<T: CacheKey, const N: usize> CacheKey for [T; N] {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_seq(self)
    }
}
impl<T: CacheKey> CacheKey for Vec<T> {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_seq(self)
    }
}
impl<T: CacheKey> CacheKey for BTreeSet<T> {
    fn write_key(&self, w: &mut KeyWriter) {
        w.byte(tag::SET);
        for v in self {
            v.write_key(w);
        }
        w.end();
    }
}
impl<K: CacheKey, V: CacheKey> CacheKey for BTreeMap<K, V> {
    fn write_key(&self, w: &mut KeyWriter) {
        w.byte(tag::MAP);
        for (k, v) in self {
            k.write_key(w);
            v.write_key(w);
        }
        w.end();
    }
}
impl<T: CacheKey, S: BuildHasher> CacheKey for HashSet<T, S> {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_unordered(tag::SET, self.iter(), |w, v| v.write_key(w));
    }
}
impl<K: CacheKey, V: CacheKey, S: BuildHasher> CacheKey for HashMap<K, V, S> {
    fn write_key(&self, w: &mut KeyWriter) {
        w.write_unordered(tag::MAP, self.iter(), |w, (k, v)| {
            k.write_key(w);
            v.write_key(w);
        });
    }
}

macro_rules! deref_impl {
    ($($t:ty),*) => {$(
        impl<T: CacheKey + ?Sized> CacheKey for $t {
            #[inline]
            fn write_key(&self, w: &mut KeyWriter) { (**self).write_key(w) }
        }
    )*};
}
deref_impl!(&T, &mut T, Box<T>, Arc<T>, Rc<T>);

macro_rules! tuple_impl {
    ($($name:ident)+) => {
        impl<$($name: CacheKey),+> CacheKey for ($($name,)+) {
            #[allow(non_snake_case)]
            fn write_key(&self, w: &mut KeyWriter) {
                let ($($name,)+) = self;
                w.begin_tuple();
                $($name.write_key(w);)+
                w.end();
            }
        }
    };
}
tuple_impl!(A);
tuple_impl!(A B);
tuple_impl!(A B C);
tuple_impl!(A B C D);
tuple_impl!(A B C D E);
tuple_impl!(A B C D E F);
tuple_impl!(A B C D E F G);
tuple_impl!(A B C D E F G H);
tuple_impl!(A B C D E F G H I);
tuple_impl!(A B C D E F G H I J);
tuple_impl!(A B C D E F G H I J K);
tuple_impl!(A B C D E F G H I J K L);

#[cfg(test)]
mod tests {
    use super::*;

    use crate::registry::Descriptor;

    macro_rules! descriptor {
        ($name:literal, $method:literal, $version:literal) => {{
            static D: Descriptor = Descriptor {
                key_name: $name,
                method: $method,
                version: $version,
                profile: "default",
                expiration: None,
                cache_none: true,
                runtime: crate::registry::DescriptorRuntime::new(),
            };
            &D
        }};
    }

    fn key(desc: &'static Descriptor, args: impl FnOnce(&mut KeyWriter)) -> Key {
        with_function_key(
            desc.registration(None),
            None,
            |w| {
                w.begin_args();
                args(w)
            },
            |k| k.to_owned(),
        )
    }

    #[test]
    fn renders_function_keys() {
        let k = key(descriptor!("shop::get_product", false, 1), |w| {
            42u64.write_key(w);
            "blue \"sky\"\\".write_key(w);
            w.write_skipped();
        });
        assert_eq!(
            k.to_string(),
            r#"shop::get_product:v1(42,"blue \"sky\"\\",*)"#
        );
        assert_eq!(Key::from_bytes(k.as_bytes()), Some(k.clone()));
        // the in-process form numbers the function instead of naming it
        assert_eq!(k.as_bytes().len(), 1 + 1 + 1 + 2 + 13 + 1 + 1);
    }

    #[test]
    fn renders_type_arguments_and_receivers() {
        let desc = descriptor!("get", true, 3);
        let k = with_function_key(
            desc.registration(Some("app::Repo")),
            Some("app::Repo"),
            |w| {
                w.type_arg("u64");
                w.type_arg("alloc::string::String");
                w.begin_args();
                w.write_skipped();
            },
            |k| k.to_owned(),
        );
        assert_eq!(
            k.to_string(),
            "app::Repo::get::<u64,alloc::string::String>:v3(*)"
        );
    }

    #[test]
    fn renders_every_std_shape() {
        assert_eq!(key_text(&-5i32), "-5");
        assert_eq!(key_text(&u128::MAX), u128::MAX.to_string());
        assert_eq!(key_text(&'\''), r"'\''");
        assert_eq!(key_text(&"\n\t\u{1}é"), r#""\n\t\u{1}é""#);
        assert_eq!(key_text(&1.5f64), "1.5");
        assert_eq!(key_text(&-0.0f64), "-0.0");
        assert!(key_text(&f64::NAN).starts_with("NaN:0x"));
        assert_eq!(key_text(&(true, (), None::<u8>)), "(true,(),None)");
        assert_eq!(key_text(&[1u8, 2]), "[1,2]");
        let map: BTreeMap<&str, u8> = [("b", 2), ("a", 1)].into();
        assert_eq!(key_text(&map), r#"{"a":1,"b":2}"#);
        let set: BTreeSet<u8> = [3, 1].into();
        assert_eq!(key_text(&set), "{1,3}");
        assert_eq!(key_text(&Arc::new(Box::new(7u8))), "7");
        assert_eq!(key_text(&Cow::Borrowed("x")), r#""x""#);
    }

    #[test]
    fn short_and_long_strings_render_alike() {
        // short printable ASCII takes a fast path: every ASCII character must come out
        // as it does in a string too long for that path
        let pad = "a".repeat(40);
        for c in (0u8..0x80).map(char::from) {
            let short = key_text(&c.to_string());
            let long = key_text(&format!("{c}{pad}"));
            assert_eq!(
                long,
                format!("{}{pad}\"", &short[..short.len() - 1]),
                "{c:?}"
            );
        }
        assert_eq!(key_text(&"a b!~"), r#""a b!~""#);
        assert_eq!(key_text(&"x".repeat(32)), format!("\"{}\"", "x".repeat(32)));
        assert_eq!(key_text(&"x".repeat(33)), format!("\"{}\"", "x".repeat(33)));
    }

    #[test]
    fn hash_collections_ignore_iteration_order() {
        let a: HashMap<String, u32> = (0..50).map(|i| (i.to_string(), i)).collect();
        let mut b: HashMap<String, u32> = HashMap::with_capacity(200);
        for i in (0..50).rev() {
            b.insert(i.to_string(), i);
        }
        let mut wa = KeyWriter::new();
        a.write_key(&mut wa);
        let mut wb = KeyWriter::new();
        b.write_key(&mut wb);
        assert_eq!(wa.as_bytes(), wb.as_bytes());
        let s: HashSet<u8> = [9, 1, 5].into();
        assert_eq!(key_text(&s), "{1,5,9}");
    }

    #[test]
    fn long_keys_keep_the_function_part_and_hash_the_rest() {
        let search = descriptor!("app::search", false, 1);
        let long = "x".repeat(2000);
        let k = key(search, |w| long.write_key(w));
        let text = k.to_text(256);
        assert!(text.starts_with("app::search:v1#"), "{text}");
        assert_eq!(text.len(), "app::search:v1#".len() + 32);
        let other = key(search, |w| format!("{long}y").write_key(w));
        assert_ne!(other.to_text(256), text);
        // short keys are left alone
        let short = key(search, |w| "q".write_key(w));
        assert_eq!(short.to_text(256), r#"app::search:v1("q")"#);
    }

    #[test]
    fn malformed_bytes_are_rejected() {
        assert!(Key::from_bytes(&[]).is_none());
        assert!(Key::from_bytes(&[tag::KEY_V1, 200]).is_none());
        assert!(
            Key::from_bytes(&[tag::KEY_V1, 0xff, 0xff, 0xff, 0x7f, tag::TUPLE, tag::END]).is_none(),
            "an unknown function number"
        );
        assert!(Key::from_bytes(b"plain text").is_none());
    }
}
