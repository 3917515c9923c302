//! Keys: `derive(CacheKey)`, the readable form, and injectivity.

use std::collections::{BTreeMap, HashMap, HashSet};

use cache_runtime::{key_text, CacheKey, KeyWriter};
use proptest::prelude::*;

#[derive(CacheKey, Clone, Debug, PartialEq)]
struct Named {
    id: u64,
    label: String,
}

#[derive(CacheKey, Clone, Debug, PartialEq)]
struct Tuple(u8, String);

#[derive(CacheKey, Clone, Debug, PartialEq)]
struct Unit;

#[derive(CacheKey, Clone, Debug, PartialEq)]
enum Shape {
    Empty,
    Circle(f64),
    Rect { w: u32, h: u32 },
}

#[derive(CacheKey, Clone, Debug, PartialEq)]
struct Wrapper<T> {
    inner: T,
}

#[test]
fn derived_shapes() {
    assert_eq!(
        key_text(&Named {
            id: 1,
            label: "a\"b".into()
        }),
        r#"Named{id:1,label:"a\"b"}"#
    );
    assert_eq!(key_text(&Tuple(3, "x".into())), r#"Tuple(3,"x")"#);
    assert_eq!(key_text(&Unit), "Unit");
    assert_eq!(key_text(&Shape::Empty), "Shape::Empty");
    assert_eq!(key_text(&Shape::Circle(1.5)), "Shape::Circle(1.5)");
    assert_eq!(
        key_text(&Shape::Rect { w: 2, h: 3 }),
        "Shape::Rect{w:2,h:3}"
    );
    assert_eq!(
        key_text(&Wrapper { inner: vec![Unit] }),
        "Wrapper{inner:[Unit]}"
    );
}

#[test]
fn readable_forms_of_std_types() {
    let map: HashMap<&str, Vec<u8>> = [("b", vec![2]), ("a", vec![])].into();
    assert_eq!(key_text(&map), r#"{"a":[],"b":[2]}"#);
    let set: HashSet<i32> = [-1, 3].into();
    // unordered collections are sorted by their encoded entries: deterministic
    assert_eq!(key_text(&set), "{-1,3}");
    assert_eq!(
        key_text(&(i64::MIN, i64::MAX, u64::MAX, -1i8)),
        format!("({},{},{},-1)", i64::MIN, i64::MAX, u64::MAX)
    );
    assert_eq!(
        key_text(&(Some("x"), None::<u8>, 'q', ())),
        r#"(Some("x"),None,'q',())"#
    );
    assert_eq!(key_text(&[0.1f32, -0.0]), "[0.1,-0.0]");
    assert_eq!(key_text(&usize::MAX), u64::MAX.to_string());
}

#[test]
fn usize_and_u64_encode_alike() {
    let mut a = KeyWriter::new();
    7usize.write_key(&mut a);
    let mut b = KeyWriter::new();
    7u64.write_key(&mut b);
    assert_eq!(
        a.as_bytes(),
        b.as_bytes(),
        "identical on 32- and 64-bit machines"
    );
}

/// An argument list mixing the types keys are usually made of.
type Args = (
    String,
    Vec<String>,
    Option<String>,
    i64,
    BTreeMap<String, u8>,
    char,
    Named,
    Shape,
);

fn tricky_string() -> impl Strategy<Value = String> {
    // separators, quotes, escapes and braces of the readable form
    proptest::string::string_regex(r#"[",():{}\[\]\\'*#a-c \n:]{0,6}"#).unwrap()
}

fn args() -> impl Strategy<Value = Args> {
    (
        tricky_string(),
        prop::collection::vec(tricky_string(), 0..3),
        prop::option::of(tricky_string()),
        prop_oneof![-3i64..3, any::<i64>()],
        prop::collection::btree_map(tricky_string(), 0u8..3, 0..3),
        prop::sample::select(vec!['"', '\'', ',', '\\', 'a']),
        (0u64..3, tricky_string()).prop_map(|(id, label)| Named { id, label }),
        prop_oneof![
            Just(Shape::Empty),
            prop::sample::select(vec![0.0, -0.0, 1.5]).prop_map(Shape::Circle),
            (0u32..2, 0u32..2).prop_map(|(w, h)| Shape::Rect { w, h }),
        ],
    )
}

fn bytes(a: &Args) -> Vec<u8> {
    let mut w = KeyWriter::new();
    a.write_key(&mut w);
    w.as_bytes().to_vec()
}

/// Equality as keys compare: floats by bits.
fn same(a: &Args, b: &Args) -> bool {
    let shape_eq = match (&a.7, &b.7) {
        (Shape::Circle(x), Shape::Circle(y)) => x.to_bits() == y.to_bits(),
        (x, y) => x == y,
    };
    a.0 == b.0
        && a.1 == b.1
        && a.2 == b.2
        && a.3 == b.3
        && a.4 == b.4
        && a.5 == b.5
        && a.6 == b.6
        && shape_eq
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn different_arguments_never_share_a_key(a in args(), b in args()) {
        let equal = same(&a, &b);
        prop_assert_eq!(equal, key_text(&a) == key_text(&b), "text: {} / {}", key_text(&a), key_text(&b));
        prop_assert_eq!(equal, bytes(&a) == bytes(&b));
    }

    #[test]
    fn near_misses_differ(a in args(), extra in tricky_string()) {
        // moving text between neighbouring strings must change the key
        let mut b = a.clone();
        b.0.push_str(&extra);
        if let Some(first) = b.1.first_mut() {
            first.insert_str(0, &extra);
        }
        prop_assert_eq!(same(&a, &b), key_text(&a) == key_text(&b));
    }

    #[test]
    fn hash_maps_ignore_insertion_order(contents in prop::collection::btree_map(tricky_string(), 0u8..5, 0..8)) {
        // each HashMap has its own random hasher seed, and they are filled in opposite orders
        let forward: HashMap<String, u8> = contents.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let mut backward: HashMap<String, u8> = HashMap::with_capacity(64);
        for (k, v) in contents.iter().rev() {
            backward.insert(k.clone(), *v);
        }
        prop_assert_eq!(key_text(&forward), key_text(&backward));
        let set_a: HashSet<&String> = contents.keys().collect();
        let set_b: HashSet<&String> = contents.keys().rev().collect();
        prop_assert_eq!(key_text(&set_a), key_text(&set_b));
    }
}
