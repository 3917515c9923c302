//! The soak's short form: 20 seconds, three instance processes, every fault once
//! (`src/bin/soak.rs`).

use std::process::Command;

/// Runs the soak with `args` and returns its JSON line.
fn soak(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_soak"))
        .args(args)
        .arg("--json")
        .output()
        .expect("run the soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON")
}

#[test]
fn twenty_seconds_with_every_fault() {
    let json = soak(&["--seconds", "20"]);
    let n = |k: &str| json[k].as_u64().unwrap_or_else(|| panic!("{k} in {json}"));
    assert!(n("calls") > 10_000, "{json}");
    assert_eq!(n("failed_calls"), 0, "{json}");
    assert_eq!(n("wrong_values"), 0, "{json}");
    assert!(n("stale_p99_ms") < 100, "{json}");
    assert_eq!(n("orphan_keys"), 0, "{json}");
    assert!(
        n("l1_clears") > 0,
        "the faults reached the instances: {json}"
    );
}

/// The same on a Redis Cluster of 3 masters and 3 replicas, with the cluster's faults
/// (a master killed, a takeover, a resharding under load, a pause, a lost
/// subscription, evictions, an instance restarted): no call fails, other instances'
/// reads are stale for at most the bus latency outside faults, and the failover
/// happened. Rows are stored without dependencies (`--mode l1`), so a value another
/// instance computed before an invalidation can land after it (the documented window
/// of `dependencies(false)`); the wrong values that window gives are printed, not
/// asserted.
#[test]
fn twenty_seconds_on_a_cluster_with_every_cluster_fault() {
    let json = soak(&["--cluster", "--seconds", "20"]);
    let n = |k: &str| json[k].as_u64().unwrap_or_else(|| panic!("{k} in {json}"));
    assert!(n("calls") > 10_000, "{json}");
    assert_eq!(n("failed_calls"), 0, "{json}");
    assert!(n("stale_p99_ms") < 500, "{json}");
    assert!(n("failover_ms") < 20_000, "{json}");
    assert!(n("l1_clears") > 0, "{json}");
}
