//! [`CacheKey`] for the standard types.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher;
use std::rc::Rc;
use std::sync::Arc;

use super::write::tag;
use super::{CacheKey, KeyWriter};

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
