//! The invalidation bus on Redis pub/sub, for `RedisBackend`'s L1 and for `RedisSync`.
//!
//! One subscriber connection per bus, in a task of its own, and publications on a
//! multiplexed [`Link`]. Pub/sub is at most once, so the subscriber treats any doubt
//! as a loss: the connection closed, or a `PING` sent every [`PING_EVERY`] went
//! unanswered for [`PING_TIMEOUT`] (a half-open connection). On a loss it tells the
//! service at once (which clears its in-process tier), reconnects and resubscribes
//! with back-off, and tells it again once subscribed, since messages published in
//! between were lost.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cache_runtime::{Backoff, BoxFuture, BusReceiver, InvalidationBus, RemoteError};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::endpoint::Endpoint;
use crate::link::Link;
use crate::single_flight::{Locks, UNLOCK_MAGIC};

/// How often the subscriber checks its connection.
pub(crate) const PING_EVERY: Duration = Duration::from_millis(300);
/// How long a check may take before the connection counts as lost.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_millis(600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Where received messages go: the receivers of the services attached (usually one;
/// several when a backend was cloned into several services).
#[derive(Default)]
pub(crate) struct Receivers(Mutex<Vec<BusReceiver>>);

impl Receivers {
    /// The live receivers; `None` once every attached service is gone.
    fn live(&self) -> Option<Vec<BusReceiver>> {
        let mut receivers = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let attached = !receivers.is_empty();
        receivers.retain(BusReceiver::is_alive);
        (!attached || !receivers.is_empty()).then(|| receivers.clone())
    }

    /// Runs `f` on every live receiver; `false` once the services are gone.
    fn each(&self, f: impl Fn(&BusReceiver)) -> bool {
        let Some(receivers) = self.live() else {
            return false;
        };
        receivers.iter().for_each(f);
        true
    }

    /// Delivers a payload; `false` once the services are gone.
    fn deliver(&self, payload: &[u8]) -> bool {
        self.each(|r| {
            r.deliver(payload);
        })
    }

    fn missed(&self) -> bool {
        self.each(|r| {
            r.missed();
        })
    }

    fn receiving(&self) -> bool {
        self.each(|r| {
            r.receiving();
        })
    }

    /// Tells the services that their in-process tiers may hold stale values.
    pub(crate) fn stale(&self) {
        self.each(|r| {
            r.stale();
        });
    }
}

/// Redis pub/sub as an [`InvalidationBus`].
pub(crate) struct RedisBus {
    channel: String,
    publisher: Arc<Link>,
    /// Bounds a publication.
    timeout: Duration,
    receivers: Arc<Receivers>,
    subscribed: watch::Receiver<bool>,
    /// The subscriber, if this bus receives.
    task: Option<AbortHandle>,
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl RedisBus {
    /// A bus that only publishes, for an instance without an in-process tier.
    pub(crate) fn publish_only(
        publisher: Arc<Link>,
        channel: String,
        timeout: Duration,
    ) -> RedisBus {
        RedisBus {
            channel,
            publisher,
            timeout,
            receivers: Arc::default(),
            subscribed: watch::channel(false).1,
            task: None,
        }
    }

    /// Starts the subscriber on `channel`; unless `lazy`, waits until it is subscribed
    /// (at most `wait`, or the connect timeout if longer) and fails if it is not.
    /// Publications take at most `wait`.
    pub(crate) async fn start(
        endpoint: Arc<Endpoint>,
        publisher: Arc<Link>,
        channel: String,
        lazy: bool,
        wait: Duration,
        locks: Option<Arc<Locks>>,
    ) -> Result<RedisBus, redis::RedisError> {
        let receivers = Arc::new(Receivers::default());
        let (tx, mut subscribed) = watch::channel(false);
        let (first_error_tx, mut first_error) = watch::channel(None::<redis::RedisError>);
        let task = tokio::spawn(subscriber(
            endpoint,
            channel.clone(),
            receivers.clone(),
            tx,
            first_error_tx,
            lazy,
            locks,
        ))
        .abort_handle();
        let bus = RedisBus {
            channel,
            publisher,
            timeout: wait,
            receivers,
            subscribed: subscribed.clone(),
            task: Some(task),
        };
        if !lazy {
            let ready = tokio::time::timeout(wait.max(CONNECT_TIMEOUT), async {
                tokio::select! {
                    r = subscribed.wait_for(|s| *s) => r.map(|_| None).unwrap_or(None),
                    r = first_error.wait_for(Option::is_some) => r.ok().and_then(|e| e.clone()),
                }
            })
            .await;
            match ready {
                Ok(None) => {}
                Ok(Some(e)) => return Err(e),
                Err(_) => {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "subscribing timed out",
                    )))
                }
            }
        }
        Ok(bus)
    }

    /// Where received messages and signals go.
    pub(crate) fn receivers(&self) -> Arc<Receivers> {
        self.receivers.clone()
    }

    /// The channel's name.
    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// Whether the subscriber is subscribed now.
    pub(crate) fn is_subscribed(&self) -> bool {
        *self.subscribed.borrow()
    }
}

impl InvalidationBus for RedisBus {
    fn attach(&self, receiver: BusReceiver) {
        let mut receivers = self
            .receivers
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Under the lock: the subscriber marks itself subscribed before it tells the
        // receivers, so this one is either told, or sees it subscribed.
        if self.task.is_some() && !self.is_subscribed() {
            receiver.waiting();
        }
        receivers.push(receiver);
    }

    fn publish(&self, payload: Vec<u8>) -> BoxFuture<'_, Result<(), RemoteError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(&self.channel).arg(payload);
            // a second try included
            tokio::time::timeout(self.timeout, self.publisher.query_again::<i64>(&cmd))
                .await
                .map_err(|_| RemoteError(format!("no answer within {:?}", self.timeout)))?
                .map(|_| ())
        })
    }
}

/// How often a subscriber that cannot subscribe says so at `warn`.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The subscriber: subscribes, delivers, checks the connection, and starts over
/// after a loss. Ends when the service it delivers to is gone. While it is not
/// subscribed, the services' in-process tiers are bypassed (see
/// [`BusReceiver::waiting`], [`BusReceiver::missed`]).
async fn subscriber(
    endpoint: Arc<Endpoint>,
    channel: String,
    receivers: Arc<Receivers>,
    subscribed: watch::Sender<bool>,
    first_error: watch::Sender<Option<redis::RedisError>>,
    lazy: bool,
    locks: Option<Arc<Locks>>,
) {
    let mut backoff = Backoff::RECONNECT;
    let mut first = true;
    let mut warned: Option<tokio::time::Instant> = None;
    let mut attempt = 0usize;
    loop {
        // on a cluster, any node: a `PUBLISH` reaches every node; the next one after
        // a failure
        let nodes = endpoint.subscribers();
        let client = nodes[attempt % nodes.len()].clone();
        attempt += 1;
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            sink.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>((sink, stream))
        })
        .await;
        let failure = match connected {
            Ok(Ok((mut sink, mut stream))) => {
                backoff.reset();
                first = false;
                subscribed.send_replace(true);
                if let Some(locks) = &locks {
                    locks.set_subscribed(true);
                }
                if warned.take().is_some() {
                    tracing::info!(target: "cache_redis", channel, "subscribed: the in-process tier is served again");
                }
                if !receivers.receiving() {
                    return;
                }
                tracing::debug!(target: "cache_redis", channel, "subscribed");
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let why = loop {
                    tokio::select! {
                        msg = stream.next() => match msg {
                            Some(msg) => {
                                let payload = msg.get_payload_bytes();
                                // a key's lock released (see `crate::single_flight`)
                                if let Some(unlock) = payload.strip_prefix(UNLOCK_MAGIC) {
                                    if let Some(locks) = &locks {
                                        locks.released(unlock);
                                    }
                                } else if !receivers.deliver(payload) {
                                    return;
                                }
                            }
                            None => break "the connection closed".to_owned(),
                        },
                        _ = ping.tick() => {
                            match tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                                Ok(Ok(_)) => {}
                                Ok(Err(e)) => break e.to_string(),
                                Err(_) => break format!("no answer to PING within {PING_TIMEOUT:?}"),
                            }
                        }
                    }
                };
                subscribed.send_replace(false);
                if let Some(locks) = &locks {
                    locks.set_subscribed(false);
                }
                tracing::warn!(target: "cache_redis", channel, "invalidation subscription lost ({why}): the in-process tier is cleared and bypassed until resubscribed");
                warned = Some(tokio::time::Instant::now());
                if !receivers.missed() {
                    return;
                }
                None
            }
            Ok(Err(e)) => Some(e),
            Err(_) => Some(redis::RedisError::from((
                redis::ErrorKind::Io,
                "subscribing timed out",
            ))),
        };
        if let Some(e) = failure {
            // the first time, every node is tried before giving up (a refusal is the
            // same on every node)
            if first && attempt < nodes.len() && e.code() != Some("NOPERM") {
                tracing::debug!(target: "cache_redis", channel, error = %e, "subscribing failed; trying the next node");
                continue;
            }
            // (a first failure without `lazy` is `build`'s error)
            let say = (lazy || !first) && warned.is_none_or(|t| t.elapsed() >= WARN_EVERY);
            if say {
                warned = Some(tokio::time::Instant::now());
                tracing::warn!(target: "cache_redis", channel, "cannot subscribe to the invalidation channel: {}; the in-process tier is bypassed (every call reads Redis) until subscribed", crate::probe::describe(&e));
            } else {
                tracing::debug!(target: "cache_redis", channel, error = %e, "subscribing failed");
            }
            if first {
                first_error.send_replace(Some(e));
            }
            first = false;
        }
        backoff.wait().await;
    }
}
