//! The `cache-redis-gc` binary's command line.

use std::process::Command;

fn gc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cache-redis-gc"))
        .args(args)
        .output()
        .expect("run cache-redis-gc")
}

#[test]
fn help_says_what_it_does() {
    let out = gc(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--url",
        "--prefix",
        "--full",
        "SIGTERM",
        "notify-keyspace-events Exe",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn bad_arguments_are_refused_with_the_help() {
    for args in [&["--url"][..], &["--prefix", "p"], &["--bogus"]] {
        let out = gc(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("USAGE"), "{err}");
    }
}

#[test]
fn an_unreachable_server_is_an_error() {
    let out = gc(&["--url", "redis://127.0.0.1:1/0", "--prefix", "p", "--full"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}
