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

use std::fmt::{self, Write as _};
use std::sync::Arc;

use crate::registry::Registration;

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

mod impls;
mod render;
mod write;

pub(crate) use render::function_id;
pub use render::key_text;
use render::{parse_header, render_key, Header, StackText, INVALID_KEY};
pub use write::KeyWriter;

/// Writes one argument into the key. A separate function so that a type without
/// `CacheKey` is reported at the argument.
#[inline]
pub fn write_arg<T: CacheKey + ?Sized>(w: &mut KeyWriter, value: &T) {
    value.write_key(w);
}

/// Builds a function key in a buffer on the stack (see [`KeyBuf`](crate::keybuf::KeyBuf)) and runs `f` on
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

    /// Runs `f` on the readable form ([`Key::to_text`]), rendered on the stack when
    /// it fits (no allocation), else in a string.
    pub(crate) fn with_text<R>(&self, max_len: usize, f: impl FnOnce(&str) -> R) -> R {
        let mut text = StackText::new();
        if render_key(&self.bytes, &mut text).is_ok() && text.len() <= max_len {
            if let Some(s) = text.as_str() {
                return f(s);
            }
        }
        f(&self.to_text(max_len))
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

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

    use super::write::tag;
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
                overrides: crate::profile::Overrides::NONE,
                background: false,
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

    /// The text a remote read renders on the stack is the text of `to_text`, for keys
    /// that fit the stack buffer, that do not, and that are shortened.
    #[test]
    fn the_stack_text_is_the_text() {
        let d = descriptor!("shop::stacked", false, 2);
        for n in [0, 10, 200, 240, 300, 2000] {
            let k = key(d, |w| {
                7u64.write_key(w);
                "é\"x".repeat(n).write_key(w);
            });
            for max in [64, 256, 4096] {
                assert_eq!(k.with_text(max, str::to_owned), k.to_text(max), "{n} {max}");
            }
        }
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
        // none to escape; C1 and DEL controls; a first byte (0xc2) that is no control
        assert_eq!(key_text(&"plain ü €"), r#""plain ü €""#);
        assert_eq!(key_text(&"a\u{85}b\u{7f}"), r#""a\u{85}b\u{7f}""#);
        assert_eq!(key_text(&"¡q\"\\"), r#""¡q\"\\""#);
        assert_eq!(
            key_text(&(0u8, 9u8, 10u16, u64::MAX)),
            format!("(0,9,10,{})", u64::MAX)
        );
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
