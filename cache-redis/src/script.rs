//! Commands' arguments: Lua scripts sent by their hash and calls of them, keys with
//! a prefix, durations.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};
use std::time::Duration;

use redis::{RedisWrite, ToRedisArgs};

/// A script, sent by its hash (`EVALSHA`), so that its text travels and is hashed by
/// the server only when the server does not have it yet.
#[derive(Debug)]
pub(crate) struct Hashed {
    /// What it is, for errors and the log.
    name: &'static str,
    text: String,
    sha: String,
}

impl Hashed {
    /// A script as it is.
    pub(crate) fn plain(name: &'static str, text: String) -> Arc<Self> {
        let sha = redis::Script::new(&text).get_hash().to_owned();
        Arc::new(Hashed { name, text, sha })
    }

    /// Marks it as a script that removes values, or one whose effects a failover must
    /// not lose for another reason (the links of a value written next): see
    /// [`removes`].
    pub(crate) fn removing(self: Arc<Self>) -> Arc<Self> {
        REMOVING
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(self.sha.clone());
        self
    }

    /// The command and its first argument: `EVALSHA` and the hash, or, for a server
    /// that answered `NOSCRIPT` (it restarted, or its scripts were flushed), `EVAL`
    /// and the text, which loads it again.
    pub(crate) fn head(&self, by_hash: bool) -> (&'static str, &str) {
        match by_hash {
            true => ("EVALSHA", &self.sha),
            false => ("EVAL", &self.text),
        }
    }
}

/// Whether the server answered that it does not have the script.
pub(crate) fn no_script(code: Option<&str>) -> bool {
    code == Some("NOSCRIPT")
}

/// A call of one of the graph's scripts: the script and the arguments after it. Sent
/// by hash, and with the text where the server answers `NOSCRIPT`: in a pipeline
/// (the writer), alone on a connection ([`ScriptCall::run`]), and in the sliding read
/// ([`Hashed::head`] written into the link's command buffer).
///
/// Not `redis::Script::invoke_async`: it runs one command by itself, and after
/// `NOSCRIPT` sends `SCRIPT LOAD` and the `EVALSHA` again (two more round trips, out
/// of order with the writer's queue); redis-rs 1.8 has no script in a pipeline.
#[derive(Clone, Debug)]
pub(crate) struct ScriptCall {
    pub(crate) script: Arc<Hashed>,
    /// The arguments after the script, in one buffer (not a command to send).
    pub(crate) args: redis::Cmd,
}

impl ScriptCall {
    pub(crate) fn arg<T: redis::ToRedisArgs>(&mut self, value: T) -> &mut Self {
        self.args.arg(value);
        self
    }

    /// The command: by hash, or with the script's text.
    pub(crate) fn cmd(&self, by_hash: bool) -> redis::Cmd {
        let (command, script) = self.script.head(by_hash);
        let mut cmd = redis::cmd(command);
        cmd.arg(script);
        for arg in self.args.args_iter() {
            if let redis::Arg::Simple(bytes) = arg {
                cmd.arg(bytes);
            }
        }
        cmd
    }

    /// Which script it runs, for errors and the log.
    pub(crate) fn name(&self) -> &'static str {
        self.script.name
    }

    /// Runs it on `con`: by hash, and once more with the text if the server does not
    /// have the script.
    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        con: &mut (impl redis::aio::ConnectionLike + Send),
    ) -> redis::RedisResult<T> {
        match self.cmd(true).query_async(con).await {
            Err(e) if no_script(e.code()) => self.cmd(false).query_async(con).await,
            result => result,
        }
    }
}

/// The hashes of the scripts that remove values (see [`Hashed::removing`]).
static REMOVING: LazyLock<RwLock<HashSet<String>>> = LazyLock::new(RwLock::default);

/// Whether a script call, by its first argument (a hash, or a script's text), is one
/// that removes values: on a cluster it waits for a replica's acknowledgement, as a
/// `DEL` does (see `cluster_pipeline`).
pub(crate) fn removes(arg: &[u8]) -> bool {
    let Ok(arg) = std::str::from_utf8(arg) else {
        return false;
    };
    let removing = REMOVING.read().unwrap_or_else(PoisonError::into_inner);
    match arg.len() {
        40 => removing.contains(arg),
        // a script sent with its text, after `NOSCRIPT`
        _ => removing.contains(redis::Script::new(arg).get_hash()),
    }
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A key with the backend's prefix, written as one argument without formatting a
/// string first.
pub(crate) struct Prefixed<'a>(pub(crate) &'a str, pub(crate) &'a str);

impl ToRedisArgs for Prefixed<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // writing into memory does not fail
        let _ = arg.write_all(self.0.as_bytes());
        let _ = arg.write_all(self.1.as_bytes());
    }
}
