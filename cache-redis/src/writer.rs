//! The writer: one task that sends the backend's writes and removals, in the order
//! queued, on the writer's connection (so a removal queued after a write of the same
//! key lands after it), pipelining what has accumulated; and its counters.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cache_runtime::RemoteError;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::link::Link;
pub(crate) use crate::script::{millis, Prefixed};
use crate::script::{no_script, ScriptCall};

/// Counters of the Redis backend's background writes, readable while it runs.
#[derive(Clone, Debug, Default)]
pub struct RedisMetrics(pub(crate) Arc<Counters>);

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) written: AtomicU64,
    pub(crate) dropped: AtomicU64,
    /// `SET`s refused or failed.
    pub(crate) failed_sets: AtomicU64,
    /// Linked writes (the graph's write script) refused or failed.
    pub(crate) failed_linked: AtomicU64,
}

impl RedisMetrics {
    /// Writes completed.
    pub fn written(&self) -> u64 {
        self.0.written.load(Ordering::Relaxed)
    }
    /// Writes dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
    /// Writes that Redis refused or that failed (both kinds; `stats().remote` tells
    /// them apart).
    pub fn failed(&self) -> u64 {
        self.0.failed_sets.load(Ordering::Relaxed) + self.0.failed_linked.load(Ordering::Relaxed)
    }
}

/// State shared with the writer: how many writes are queued or in progress.
pub(crate) struct Backlog {
    pub(crate) pending: AtomicUsize,
    pub(crate) drained: Notify,
}

/// What the writer does, in the order queued: a removal queued after a write of the
/// same key lands after it.
pub(crate) enum Op {
    Set {
        key: String,
        value: Vec<u8>,
        ttl: Duration,
    },
    /// A script whose reply nobody waits for (a conditional write).
    Send(ScriptCall),
    /// On a cluster, a value's write with its links: the links on the graph's slot
    /// (`graph`), then, if they were accepted, the value on its own (`put`).
    Linked {
        graph: ScriptCall,
        put: Box<ScriptCall>,
    },
    /// A key's lock released (see [`crate::single_flight`]): sent after the batch's
    /// writes, on a cluster after their values too, so that the instances it wakes
    /// read the value.
    Unlock(ScriptCall),
    /// A command whose reply the sender waits for; without one, the sender only waits
    /// for the operations queued before. `then` is sent right after it, in the same
    /// pipeline (its reply is not looked at).
    Call {
        cmd: Option<Command>,
        then: Option<Box<redis::Cmd>>,
        done: oneshot::Sender<CallReply>,
    },
}

/// A command the writer sends: a plain one, or a graph script (by hash, sent again
/// with its text on `NOSCRIPT`).
pub(crate) enum Command {
    Plain(redis::Cmd),
    Script(ScriptCall),
}

impl Command {
    /// What it is, for errors and the log: its name, and for a script, which one.
    fn describe(&self) -> String {
        match self {
            Command::Plain(cmd) => name_of(cmd),
            Command::Script(call) => format!("EVALSHA ({})", call.name()),
        }
    }
}

/// A plain command's name, for errors and the log.
fn name_of(cmd: &redis::Cmd) -> String {
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => String::from_utf8_lossy(name).to_ascii_uppercase(),
        _ => "a command".to_owned(),
    }
}

/// The reply to [`Op::Call`]: `cmd`'s reply (`Nil` without one) and, if `then` was
/// sent and failed, why.
pub(crate) type CallReply = Result<(redis::Value, Option<RemoteError>), RemoteError>;

/// The background writer: takes queued operations in batches and sends each batch as
/// one pipeline, in order. A batch that fails (the connection) is counted and dropped
/// (the entries are simply not in Redis; the next miss writes them again), and its
/// removals report the failure; an operation the server refuses fails alone. Graph
/// scripts go by their hash; those the server does not have are sent again with their
/// text, in order, before the next batch.
pub(crate) async fn writer(
    link: Arc<Link>,
    prefix: String,
    mut rx: mpsc::Receiver<Op>,
    metrics: RedisMetrics,
    backlog: Arc<Backlog>,
) {
    const BATCH: usize = 128;
    let mut batch = Vec::with_capacity(BATCH);
    let warn = crate::link::RateLimited::default();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // for each command of the pipeline, the script it runs, if any
        let mut scripts: Vec<Option<&ScriptCall>> = Vec::with_capacity(batch.len());
        for op in &batch {
            match op {
                Op::Set { key, value, ttl } => {
                    pipe.cmd("SET")
                        .arg(Prefixed(&prefix, key))
                        .arg(value)
                        .arg("PX")
                        .arg(millis(*ttl));
                    scripts.push(None);
                }
                Op::Send(call) | Op::Linked { graph: call, .. } => {
                    pipe.add_command(call.cmd(true));
                    scripts.push(Some(call));
                }
                Op::Unlock(_) => {}
                Op::Call { cmd, then, .. } => {
                    match cmd {
                        Some(Command::Plain(cmd)) => {
                            pipe.add_command(cmd.clone());
                            scripts.push(None);
                        }
                        Some(Command::Script(call)) => {
                            pipe.add_command(call.cmd(true));
                            scripts.push(Some(call));
                        }
                        None => {}
                    }
                    if let Some(then) = then {
                        pipe.add_command((**then).clone());
                        scripts.push(None);
                    }
                }
            }
        }
        let mut result = match pipe.is_empty() {
            true => Ok(Vec::new()),
            false => link.pipeline_again::<Vec<redis::Value>>(&pipe).await,
        };
        if let Ok(replies) = &mut result {
            resend_with_text(&link, &scripts, replies).await;
        }
        drop(scripts);
        if let Err(e) = &result {
            let e = format!(
                "a batch of {} operations on Redis failed: {}",
                batch.len(),
                e.0
            );
            warn.warn("a batch", &RemoteError(e));
        }
        let n = batch.len();
        let mut replies = match &mut result {
            Ok(values) => std::mem::take(values).into_iter(),
            Err(_) => Vec::new().into_iter(),
        };
        // the reply of the next command sent, with what it was for the log
        let mut next = |what: &dyn Fn() -> String| -> Result<redis::Value, RemoteError> {
            match &result {
                Err(e) => Err(RemoteError(format!(
                    "Redis did not answer {}: {}",
                    what(),
                    e.0
                ))),
                Ok(_) => match replies.next() {
                    Some(redis::Value::ServerError(e)) => {
                        let what = what();
                        let e = RemoteError(format!("Redis refused {what}: {}", server_words(&e)));
                        warn.warn(&what, &e);
                        Err(e)
                    }
                    Some(v) => Ok(v),
                    None => Err(RemoteError(format!("no reply to {}", what()))),
                },
            }
        };
        // on a cluster, the values whose links were accepted
        let mut puts = Vec::new();
        // the replies to calls, given once the values of the writes queued before
        // them are written (a `refresh!` reads its value right after)
        let mut answers = Vec::new();
        let mut unlocks = Vec::new();
        for op in batch.drain(..) {
            match op {
                Op::Unlock(call) => unlocks.push(call),
                Op::Linked { graph, put } => {
                    match next(&|| format!("EVALSHA ({})", graph.name())) {
                        // when the links were recorded: the value's deadline follows
                        Ok(redis::Value::Int(at)) if at > 0 => {
                            let mut put = *put;
                            put.arg(at.unsigned_abs() + crate::graph::PUT_WINDOW_MS);
                            puts.push(put);
                        }
                        // refused by a marker: nothing to write
                        Ok(_) => {
                            metrics.0.written.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            metrics.0.failed_linked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Op::Set { .. } => {
                    let counter = match next(&|| "SET".to_owned()) {
                        Ok(_) => &metrics.0.written,
                        Err(_) => &metrics.0.failed_sets,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Op::Send(call) => {
                    let counter = match next(&|| format!("EVALSHA ({})", call.name())) {
                        Ok(_) => &metrics.0.written,
                        Err(_) => &metrics.0.failed_linked,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Op::Call { cmd, then, done } => {
                    let reply = match &cmd {
                        Some(cmd) => next(&|| cmd.describe()),
                        None => Ok(redis::Value::Nil),
                    };
                    let then = then.and_then(|then| next(&|| name_of(&then)).err());
                    answers.push((done, reply.map(|v| (v, then))));
                }
            }
        }
        if !puts.is_empty() {
            // a value's write checks its slot's tombstone: its order with the
            // invalidations does not matter
            let counter = match run_scripts(&link, &puts).await {
                Ok(_) => &metrics.0.written,
                Err(e) => {
                    warn.warn("a value's write", &e);
                    &metrics.0.failed_linked
                }
            };
            counter.fetch_add(puts.len() as u64, Ordering::Relaxed);
        }
        if !unlocks.is_empty() {
            if let Err(e) = run_scripts(&link, &unlocks).await {
                warn.warn("a lock's release", &e);
                // sent again until it goes through: a lock left in place holds the
                // other instances' misses of its key back for its whole lock timeout
                tokio::spawn(unlock_again(link.clone(), unlocks));
            }
        }
        for (done, answer) in answers {
            let _ = done.send(answer);
        }
        if backlog.pending.fetch_sub(n, Ordering::SeqCst) == n {
            backlog.drained.notify_waiters();
        }
    }
}

/// Sends lock releases that failed again, with back-off, for as long as a lock can
/// live (the releases check their token: sending one twice does no harm).
async fn unlock_again(link: Arc<Link>, unlocks: Vec<ScriptCall>) {
    let mut backoff =
        cache_runtime::Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    let give_up = tokio::time::Instant::now() + Duration::from_secs(600);
    while tokio::time::Instant::now() < give_up {
        backoff.wait().await;
        if run_scripts(&link, &unlocks).await.is_ok() {
            return;
        }
    }
}

/// The server's words for an error reply: its code and details.
pub(crate) fn server_words(e: &redis::ServerError) -> String {
    match e.details() {
        Some(details) => format!("{} {details}", e.code()),
        None => e.code().to_owned(),
    }
}

/// Sends again, with their text, the graph scripts the server did not have
/// (`NOSCRIPT`), in order, and puts their replies in `replies`. If that fails, their
/// replies stay errors.
pub(crate) async fn resend_with_text(
    link: &Arc<Link>,
    scripts: &[Option<&ScriptCall>],
    replies: &mut [redis::Value],
) {
    let unknown =
        |v: &redis::Value| matches!(v, redis::Value::ServerError(e) if no_script(Some(e.code())));
    let mut again = redis::pipe();
    again.ignore_errors();
    let mut at = Vec::new();
    for (i, script) in scripts.iter().enumerate() {
        if let (Some(call), true) = (script, replies.get(i).is_some_and(unknown)) {
            again.add_command(call.cmd(false));
            at.push(i);
        }
    }
    if at.is_empty() {
        return;
    }
    if let Ok(values) = link.query_pipeline::<Vec<redis::Value>>(&again).await {
        for (i, v) in at.into_iter().zip(values) {
            replies[i] = v;
        }
    }
}

/// Runs script calls as one pipeline (split by slot on a cluster), by hash, and with
/// their text where the server does not have them. `Err` if the pipeline failed or
/// any call was refused.
pub(crate) async fn run_scripts(
    link: &Arc<Link>,
    calls: &[ScriptCall],
) -> Result<Vec<redis::Value>, RemoteError> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for call in calls {
        pipe.add_command(call.cmd(true));
    }
    let mut replies: Vec<redis::Value> = link.pipeline_again(&pipe).await?;
    let scripts: Vec<Option<&ScriptCall>> = calls.iter().map(Some).collect();
    resend_with_text(link, &scripts, &mut replies).await;
    for (call, reply) in calls.iter().zip(&replies) {
        if let redis::Value::ServerError(e) = reply {
            return Err(RemoteError(format!(
                "Redis refused EVALSHA ({}): {}",
                call.name(),
                server_words(e)
            )));
        }
    }
    Ok(replies)
}
