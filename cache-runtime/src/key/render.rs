//! The readable form of a key, rendered from its bytes: `name:vN(args)`, strings and
//! chars quoted and escaped, every composite delimited.

use std::fmt;

use super::write::tag;
use super::{CacheKey, Key, KeyWriter};
use crate::registry::registration_by_id;

/// The function part of a key (`name::<types>:vN`) and the bytes of its arguments.
pub(super) fn parse_header(bytes: &[u8]) -> Option<(Header<'_>, &[u8])> {
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

pub(super) const INVALID_KEY: &str = "<invalid key>";

/// Writes the readable form of a key: its function part, then its arguments.
pub(super) fn render_key<W: fmt::Write + ?Sized>(bytes: &[u8], f: &mut W) -> fmt::Result {
    // A function that is not generic nor a method: its part is rendered already.
    let mut r = Reader { bytes };
    if let (Some(tag::KEY_V1), Some(id)) = (r.byte(), r.varint()) {
        let reg = u32::try_from(id).ok().and_then(registration_by_id);
        if let (Some(header), Some(tag::TUPLE)) = (reg.and_then(|r| r.header.as_deref()), r.byte())
        {
            f.write_str(header)?;
            f.write_char('(')?;
            render_items(&mut r, f, false)?;
            return f.write_char(')');
        }
    }
    match parse_header(bytes) {
        Some((header, rest)) => {
            header.render(f)?;
            f.write_char('(')?;
            let mut r = Reader { bytes: rest };
            render_items(&mut r, f, false)?;
            f.write_char(')')
        }
        None => f.write_str(INVALID_KEY),
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({self})")
    }
}

pub(super) struct Header<'a> {
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
    pub(super) fn render<W: fmt::Write + ?Sized>(&self, f: &mut W) -> fmt::Result {
        if let Some(receiver) = self.receiver {
            f.write_str(receiver)?;
            f.write_str("::")?;
        }
        f.write_str(self.name)?;
        if !self.types.is_empty() {
            f.write_str("::<")?;
            for (i, t) in self.types.iter().enumerate() {
                if i > 0 {
                    f.write_char(',')?;
                }
                f.write_str(t)?;
            }
            f.write_char('>')?;
        }
        f.write_str(":v")?;
        write_u64(f, u64::from(self.version))
    }
}

/// Writes `n` in decimal (without the formatting machinery), in one write.
fn write_u64<W: fmt::Write + ?Sized>(f: &mut W, n: u64) -> fmt::Result {
    let mut buf = [0u8; 20];
    f.write_str(ascii(digits(n, &mut buf)))
}

/// ASCII bytes as a `str`, without validating them again: a call of
/// `str::from_utf8` for each number and string of a key cost more than the rest of
/// rendering them (126 instructions of 596 for a key of two arguments).
#[allow(unsafe_code)]
#[inline(always)]
fn ascii(bytes: &[u8]) -> &str {
    debug_assert!(bytes.is_ascii());
    // SAFETY: every caller passes ASCII (digits, or bytes `plain` checked), and ASCII
    // is UTF-8.
    unsafe { std::str::from_utf8_unchecked(bytes) }
}

/// A signed integer from its zigzag encoding (as `KeyWriter` writes it).
#[inline(always)]
fn unzigzag(z: u64) -> i64 {
    (z >> 1) as i64 ^ -((z & 1) as i64)
}

/// The decimal digits of `n`, written at the end of `buf`.
#[inline(always)]
fn digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Text written on the stack, up to [`StackText::CAPACITY`] bytes: a write that does
/// not fit fails (and the text is then not used).
pub(super) struct StackText {
    buf: [u8; StackText::CAPACITY],
    len: usize,
    /// Whether a write did not fit.
    overflow: bool,
}

impl StackText {
    const CAPACITY: usize = 256;

    pub(super) fn new() -> Self {
        StackText {
            buf: [0; Self::CAPACITY],
            len: 0,
            overflow: false,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// The text, if every write fitted.
    #[allow(unsafe_code)]
    pub(super) fn as_str(&self) -> Option<&str> {
        if self.overflow {
            return None;
        }
        let bytes = &self.buf[..self.len];
        debug_assert!(std::str::from_utf8(bytes).is_ok());
        // SAFETY: the bytes are whole `str`s appended by `write_str` (a `char` is
        // written as its UTF-8 encoding, by the default `write_char`), so UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(bytes) })
    }
}

impl fmt::Write for StackText {
    #[inline]
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        match self.buf.get_mut(self.len..end) {
            Some(dst) if !self.overflow => {
                dst.copy_from_slice(s.as_bytes());
                self.len = end;
                Ok(())
            }
            _ => {
                self.overflow = true;
                Err(fmt::Error)
            }
        }
    }
}

/// Whether `bytes` are printable ASCII with no quote nor backslash: a string that is
/// written as it is. (A loop, not an iterator adapter: this runs on every remote read.)
#[inline(always)]
fn plain(bytes: &[u8]) -> bool {
    let mut ok = true;
    for &b in bytes {
        ok &= (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\');
    }
    ok
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

/// Renders values until the closing `END` (consumed), separated by commas.
/// With `fields`, each value is preceded by `FIELD name` and rendered `name:value`.
fn render_items<W: fmt::Write + ?Sized>(
    r: &mut Reader<'_>,
    f: &mut W,
    fields: bool,
) -> fmt::Result {
    let mut first = true;
    loop {
        if r.peek().ok_or_else(bad)? == tag::END {
            r.byte();
            return Ok(());
        }
        if !first {
            f.write_char(',')?;
        }
        first = false;
        if fields {
            if r.byte() != Some(tag::FIELD) {
                return Err(bad());
            }
            f.write_str(r.str().ok_or_else(bad)?)?;
            f.write_char(':')?;
        }
        render_value(r, f)?;
    }
}

fn render_value<W: fmt::Write + ?Sized>(r: &mut Reader<'_>, f: &mut W) -> fmt::Result {
    let t = r.byte().ok_or_else(bad)?;
    match t {
        tag::U64 => write_u64(f, r.varint().ok_or_else(bad)?),
        tag::I64 => {
            let v = unzigzag(r.varint().ok_or_else(bad)?);
            if v < 0 {
                f.write_char('-')?;
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
            // The usual string argument needs no escape: written whole.
            if plain(bytes) {
                f.write_str(ascii(bytes))?;
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
            f.write_char(')')
        }
        tag::SKIPPED => f.write_char('*'),
        tag::SEQ => {
            f.write_char('[')?;
            render_items(r, f, false)?;
            f.write_char(']')
        }
        tag::TUPLE => {
            f.write_char('(')?;
            render_items(r, f, false)?;
            f.write_char(')')
        }
        tag::SET => {
            f.write_char('{')?;
            render_items(r, f, false)?;
            f.write_char('}')
        }
        tag::MAP => {
            f.write_char('{')?;
            let mut first = true;
            loop {
                if r.peek().ok_or_else(bad)? == tag::END {
                    r.byte();
                    break;
                }
                if !first {
                    f.write_char(',')?;
                }
                first = false;
                render_value(r, f)?;
                f.write_char(':')?;
                render_value(r, f)?;
            }
            f.write_char('}')
        }
        tag::STRUCT => {
            f.write_str(r.str().ok_or_else(bad)?)?;
            f.write_char('{')?;
            render_items(r, f, true)?;
            f.write_char('}')
        }
        tag::TUPLE_STRUCT => {
            f.write_str(r.str().ok_or_else(bad)?)?;
            f.write_char('(')?;
            render_items(r, f, false)?;
            f.write_char(')')
        }
        tag::UNIT_STRUCT => f.write_str(r.str().ok_or_else(bad)?),
        tag::VARIANT | tag::VARIANT_TUPLE | tag::VARIANT_STRUCT => {
            f.write_str(r.str().ok_or_else(bad)?)?;
            f.write_str("::")?;
            f.write_str(r.str().ok_or_else(bad)?)?;
            match t {
                tag::VARIANT_TUPLE => {
                    f.write_char('(')?;
                    render_items(r, f, false)?;
                    f.write_char(')')
                }
                tag::VARIANT_STRUCT => {
                    f.write_char('{')?;
                    render_items(r, f, true)?;
                    f.write_char('}')
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

/// The registration number of the function an in-process key belongs to.
pub(crate) fn function_id(bytes: &[u8]) -> Option<u32> {
    let mut r = Reader { bytes };
    if r.byte()? != tag::KEY_V1 {
        return None;
    }
    u32::try_from(r.varint()?).ok()
}
