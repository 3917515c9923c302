//! A private `redis-server` for one test: its own port and directory, nothing kept on
//! disk, stopped when dropped. Tests can stop, restart and pause it.
//!
//! Tests never use a Redis that happens to be running: each starts its own, so they
//! run in parallel and can break their server without disturbing the others. Without
//! a `redis-server` binary on `PATH`, starting one fails with the install hint.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "redis-server was not found on PATH. The Redis tests start their own server: install it (Debian/Ubuntu: `apt-get install -y redis-server`; macOS: `brew install redis`) and run the tests again";

/// A `redis-server` process owned by a test.
pub struct RedisServer {
    port: u16,
    /// With TLS: the TLS port and the CA certificate (PEM) that signed the server's.
    tls: Option<(u16, Vec<u8>)>,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

impl RedisServer {
    /// Starts a server with the settings the cache needs (`volatile-lru` eviction,
    /// keyspace notifications for expiry and eviction).
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (`["--maxmemory", "1mb"]`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_on(extra, free_port)
    }

    /// Starts a server with extra arguments on a port `pick` chooses (tried again on
    /// another if it was taken meanwhile).
    pub fn start_on(extra: &[&str], pick: fn() -> u16) -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "cache-rs-redis-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let mut args: Vec<String> = [
            "--maxmemory-policy",
            "volatile-lru",
            "--notify-keyspace-events",
            "Kxe",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        for _ in 0..10 {
            let port = pick();
            let mut server = RedisServer {
                port,
                tls: None,
                dir: dir.clone(),
                args: args.clone(),
                child: None,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server on a free port after 10 tries");
    }

    /// Starts a server that also accepts TLS connections, with a certificate for
    /// 127.0.0.1 signed by a CA made for it (with the `openssl` command).
    pub fn start_tls() -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "cache-rs-redis-tls-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create the certificates' directory");
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("openssl is needed for the TLS test: apt-get install -y openssl");
            assert!(status.success(), "openssl {args:?} failed");
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=cache-rs test CA",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")
            .expect("write san.ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ]);
        let ca = std::fs::read(dir.join("ca.crt")).expect("read ca.crt");
        let tls_port = free_port();
        let tls_port_arg = tls_port.to_string();
        let cert = dir.join("server.crt");
        let key = dir.join("server.key");
        let ca_file = dir.join("ca.crt");
        let mut server = Self::start_with(&[
            "--tls-port",
            &tls_port_arg,
            "--tls-cert-file",
            cert.to_str().expect("utf-8 path"),
            "--tls-key-file",
            key.to_str().expect("utf-8 path"),
            "--tls-ca-cert-file",
            ca_file.to_str().expect("utf-8 path"),
            "--tls-auth-clients",
            "no",
        ]);
        server.tls = Some((tls_port, ca));
        server
    }

    /// `rediss://127.0.0.1:<tls port>/0` and the CA certificate to trust, for a server
    /// started with [`RedisServer::start_tls`].
    pub fn tls(&self) -> Option<(String, Vec<u8>)> {
        self.tls
            .as_ref()
            .map(|(port, ca)| (format!("rediss://127.0.0.1:{port}/0"), ca.clone()))
    }

    /// Starts the process on this server's port; false if it did not come up.
    fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{INSTALL_HINT}"),
            Err(e) => panic!("could not start redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let _ = status; // exited: the port was taken
                self.child = None;
                return false;
            }
            // any answer will do (`-NOAUTH` from a server with a password)
            if self
                .command(&["PING"])
                .is_some_and(|r| r == "+PONG" || r.starts_with("-NOAUTH"))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `redis://user:password@127.0.0.1:<port>/0`.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("redis://{user}:{password}@127.0.0.1:{}/0", self.port)
    }

    /// Creates (or resets) the ACL user `user` with password `pw`: every command, key
    /// and channel, then `rules` (`["-del", "-unlink"]` takes those away).
    pub fn acl_user(&self, user: &str, rules: &[&str]) {
        let password = format!(">{}", Self::PASSWORD);
        let mut args = vec![
            "ACL", "SETUSER", user, "reset", "on", &password, "~*", "&*", "+@all",
        ];
        args.extend_from_slice(rules);
        assert_eq!(
            self.command(&args).as_deref(),
            Some("+OK"),
            "ACL SETUSER {args:?}"
        );
    }

    /// Changes the ACL user `user` by `rules`, keeping the rest.
    pub fn acl_change(&self, user: &str, rules: &[&str]) {
        let mut args = vec!["ACL", "SETUSER", user];
        args.extend_from_slice(rules);
        assert_eq!(
            self.command(&args).as_deref(),
            Some("+OK"),
            "ACL SETUSER {args:?}"
        );
    }

    /// The password of the users [`RedisServer::acl_user`] creates.
    pub const PASSWORD: &'static str = "pw";

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (its data is gone: nothing is kept on disk).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// Freezes the process (`SIGSTOP`): it neither answers nor replicates until
    /// [`RedisServer::resume`].
    pub fn suspend(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen process run again (`SIGCONT`).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("the server runs").id();
        let status = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {pid} failed");
    }

    /// Stops the server from answering clients for `duration` (`CLIENT PAUSE`).
    pub fn pause(&self, duration: Duration) {
        let ms = duration.as_millis().to_string();
        let reply = self.command(&["CLIENT", "PAUSE", &ms, "ALL"]);
        assert_eq!(reply.as_deref(), Some("+OK"), "CLIENT PAUSE failed");
    }

    /// Stops the server from running write commands for `duration`; reads go on
    /// (`CLIENT PAUSE ... WRITE`).
    pub fn pause_writes(&self, duration: Duration) {
        let ms = duration.as_millis().to_string();
        let reply = self.command(&["CLIENT", "PAUSE", &ms, "WRITE"]);
        assert_eq!(reply.as_deref(), Some("+OK"), "CLIENT PAUSE WRITE failed");
    }

    /// Sends one command and returns the first line of the reply (`+OK`, `:3`, ...).
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        stream.write_all(req.as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).ok()?;
        Some(line.trim_end().to_owned())
    }

    /// A field of `CLUSTER INFO` (`cluster_state`), if the server answers it.
    pub fn info(&self, field: &str) -> Option<String> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut con = client.get_connection().ok()?;
        let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut con).ok()?;
        let prefix = format!("{field}:");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|v| v.trim().to_owned())
    }

    /// How many times the server ran `command` (from `INFO commandstats`).
    pub fn calls(&self, command: &str) -> u64 {
        let client = redis::Client::open(self.url()).expect("valid url");
        let mut con = client.get_connection().expect("connect");
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut con)
            .expect("INFO");
        let prefix = format!("cmdstat_{}:calls=", command.to_ascii_lowercase());
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
