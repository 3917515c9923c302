//! The soak's short form: 20 seconds, three instance processes, every fault once
//! (`src/bin/soak.rs`).

use std::process::Command;

#[test]
fn twenty_seconds_with_every_fault() {
    let out = Command::new(env!("CARGO_BIN_EXE_soak"))
        .args(["--seconds", "20", "--json"])
        .output()
        .expect("run the soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON");
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
