//! An instance process (`src/bin/cache_instance.rs`) driven by commands, for the tests
//! of what crosses between processes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis_server::RedisServer;

/// One instance process.
pub struct Instance {
    child: Child,
    /// Its standard input, for commands sent without waiting for the answer.
    pub stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Instance {
    /// Starts `exe` (`env!("CARGO_BIN_EXE_cache_instance")`) in `mode` on the two
    /// servers, and waits until it is ready.
    pub fn start(exe: &str, mode: &str, cache: &RedisServer, db: &RedisServer) -> Instance {
        Self::start_url(exe, mode, &cache.url(), db)
    }

    /// [`Instance::start`] with the cache's URL given (another user, say).
    pub fn start_url(exe: &str, mode: &str, cache_url: &str, db: &RedisServer) -> Instance {
        Self::start_with(exe, mode, cache_url, db, &[])
    }

    /// [`Instance::start_url`] with environment variables (`CACHE_INSTANCE_EAGER`).
    pub fn start_with(
        exe: &str,
        mode: &str,
        cache_url: &str,
        db: &RedisServer,
        env: &[(&str, &str)],
    ) -> Instance {
        let mut child = Command::new(exe)
            .args([mode, cache_url, &db.url()])
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start cache_instance");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut instance = Instance {
            child,
            stdin,
            stdout,
        };
        assert_eq!(instance.line(), "ready");
        instance
    }

    /// Kills the process at once (`SIGKILL`): nothing it holds is released.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The next line it prints.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read an answer");
        assert!(!line.is_empty(), "the instance exited");
        line.trim_end().to_owned()
    }

    /// Sends a command and returns the answer.
    pub fn cmd(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("send a command");
        self.line()
    }

    /// A counter from `stats`.
    pub fn stat(&mut self, name: &str) -> u64 {
        let stats = self.cmd("stats");
        stats
            .split(' ')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {stats}"))
    }

    /// Waits until `stat` reaches `at_least`.
    pub fn wait_stat(&mut self, name: &str, at_least: u64, limit: Duration) -> u64 {
        let start = Instant::now();
        loop {
            let v = self.stat(name);
            if v >= at_least {
                return v;
            }
            assert!(start.elapsed() < limit, "{name} stayed at {v}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
    }
}

/// `rounds` rounds over `ids` rows: B reads a row and serves it from its cache, A
/// changes it (`set`), and B drops its copy within 200 ms and reads the new value.
/// Returns how long B took to drop its copy each round, in microseconds.
pub fn crossing_rounds(a: &mut Instance, b: &mut Instance, rounds: u64, ids: u64) -> Vec<u64> {
    let mut delays = Vec::new();
    for round in 0..rounds {
        let id = round % ids;
        let old = b.cmd(&format!("get {id}"));
        b.cmd("flush"); // B's write of the old value, if any, lands first
        let runs = b.stat("runs");
        assert_eq!(b.cmd(&format!("get {id}")), old);
        assert_eq!(b.stat("runs"), runs, "B served it from its cache");
        assert_eq!(a.cmd(&format!("set {id} v{round}")), "ok");
        let micros: u64 = b
            .cmd(&format!("wait_drop {id} 200"))
            .parse()
            .expect("B dropped its copy within 200 ms");
        assert!(micros < 200_000);
        delays.push(micros);
        assert_eq!(b.cmd(&format!("get {id}")), format!("v{round}"));
    }
    delays
}

/// Checks the answers of two instances' `random` commands: each read more than 1,000
/// times and read nothing stale.
pub fn assert_random_runs(a: &str, b: &str) {
    eprintln!("A: {a}; B: {b}");
    for r in [a, b] {
        assert!(r.ends_with(" stale=0"), "{r}");
        let reads: u64 = r.split(' ').nth(1).unwrap()[6..].parse().unwrap();
        assert!(reads > 1_000, "{r}");
    }
}
