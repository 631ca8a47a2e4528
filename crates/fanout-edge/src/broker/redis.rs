//! The Redis broker, through `fred`: one subscriber connection per node for
//! SUBSCRIBE/UNSUBSCRIBE and incoming messages, and one command connection for
//! publishing (the publish script of `fanout-publisher`). Both reconnect on their own
//! with capped exponential backoff; after the subscriber reconnects the node subscribes
//! every wanted channel again.
//!
//! With `redis-cluster://` the subscriber is a cluster client with one connection per
//! primary (shard) and uses sharded pub/sub: SSUBSCRIBE goes to the shard that owns the
//! channel's slot, and publishes use SPUBLISH (inside the publish script, whose keys
//! hash-tag the channel, so script, history and channel share that slot). A watcher
//! reads the slot map every second; when a slot changes owner (failover, resharding) —
//! Redis then drops the old owner's sharded subscriptions with `sunsubscribe` — every
//! channel is subscribed again at its new owner and checked against its history.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fanout_publisher::{HistoryPolicy, PublishAck, PublishError, Publisher};
use fred::prelude::*;
use serde_json::value::RawValue;
use tokio::sync::broadcast::error::RecvError;

use super::{Broker, BrokerError, HistoryQuery, HistoryRead, SharedSink, MAX_HISTORY_READ};
use crate::metrics as m;
use fanout_protocol::{layout, Envelope};

pub struct RedisBroker {
    subscriber: Client,
    /// Redis Cluster: sharded pub/sub (SSUBSCRIBE/SPUBLISH).
    sharded: bool,
    publisher: Publisher,
    history_sha: String,
    presence_refresh_sha: String,
    presence_prune_sha: String,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// One SUBSCRIBE/UNSUBSCRIBE at a time on the (single) subscriber connection: each
    /// is confirmed by a PING that must follow it in step, which calls made at once
    /// would interleave. (Sharded mode needs none: each SSUBSCRIBE has its own reply.)
    in_order: tokio::sync::Mutex<()>,
}

/// Messages buffered between fred's connection task and the node's reader. A reader
/// that falls further behind is counted and logged, never silent. fred gives every
/// notification stream of a client this capacity, preallocated, so only the subscriber
/// client gets it (each slot costs memory whether used or not).
const SUBSCRIBER_BUFFER: usize = 16 * 1024;

fn builder(url: &str, notification_capacity: usize) -> Result<Builder, BrokerError> {
    let config =
        fanout_publisher::redis_config(url).map_err(|e| BrokerError::Invalid(e.to_string()))?;
    let mut builder = Builder::from_config(config);
    builder
        .with_performance_config(|p| {
            p.default_command_timeout = Duration::from_secs(5);
            p.broadcast_channel_capacity = notification_capacity;
        })
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            c.internal_command_timeout = Duration::from_secs(5);
            c.max_command_attempts = 1;
            // A command left unanswered this long means the connection is dead: fred
            // closes it and reconnects.
            c.unresponsive = fred::types::config::UnresponsiveConfig {
                max_timeout: Some(Duration::from_secs(10)),
                interval: Duration::from_secs(2),
            };
            c.tcp = fred::types::config::TcpConfig {
                nodelay: Some(true),
                ..Default::default()
            };
        })
        .set_policy({
            // Capped exponential backoff (100 ms → 5 s) with up to 250 ms of jitter,
            // so that a fleet of nodes does not reconnect in lockstep.
            let mut policy = ReconnectPolicy::new_exponential(0, 100, 5_000, 2);
            policy.set_jitter(250);
            policy
        });
    Ok(builder)
}

/// `{epoch or '', top, {envelope…}}` from the history script.
fn parse_history(reply: Value, newest_first: bool) -> Result<HistoryRead, BrokerError> {
    let bad = |what: &str| BrokerError::Unavailable(format!("unexpected history reply: {what}"));
    let Value::Array(mut parts) = reply else {
        return Err(bad("not an array"));
    };
    if parts.len() != 3 {
        return Err(bad("wrong length"));
    }
    let raw_entries = parts.pop().expect("three parts");
    let top = parts
        .pop()
        .expect("three parts")
        .as_u64()
        .ok_or_else(|| bad("top"))?;
    let epoch = parts
        .pop()
        .expect("three parts")
        .as_string()
        .filter(|e| !e.is_empty());
    let mut entries: Vec<Arc<Envelope>> = match raw_entries {
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_bytes())
            .map(|b| Arc::new(Envelope::decode(b, 0)))
            .collect(),
        Value::Null => Vec::new(),
        _ => return Err(bad("entries")),
    };
    if newest_first {
        entries.reverse();
    }
    Ok(HistoryRead {
        epoch,
        top,
        entries,
    })
}

/// Whether `reply` is the answer to `PING token` (`["pong", token]` on a subscribed
/// RESP2 connection, `token` otherwise).
fn pong_of(reply: &Value, token: &str) -> bool {
    match reply {
        Value::Array(parts) => parts.iter().any(|p| p.as_str().as_deref() == Some(token)),
        other => other.as_str().as_deref() == Some(token),
    }
}

/// Writes presence entries of one channel and lengthens its key's expiry, atomically
/// (see the script's header for the arguments).
pub const PRESENCE_REFRESH_SCRIPT: &str = include_str!("presence_refresh.lua");

/// Deletes the presence entries of one channel that are expired at deletion time
/// (see the script's header for the arguments).
pub const PRESENCE_PRUNE_SCRIPT: &str = include_str!("presence_prune.lua");

/// The set of nodes that have reported.
const NODES_KEY: &str = "fanout:nodes";

/// A node's report.
fn node_key(node: &str) -> String {
    format!("fanout:node:{node}")
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// How often the cluster's slot map is read. Between a failover and the next read the
/// moved shard's channels are deaf (Redis has unsubscribed them), and what is published
/// meanwhile comes back only through history: this bounds the gap that history must
/// cover. A read is one `CLUSTER SLOTS`, four a second per node.
const TOPOLOGY_INTERVAL: Duration = Duration::from_millis(250);

/// Which primary owns which slots, as a comparable value.
fn slot_map(client: &Client) -> Vec<(u16, u16, String)> {
    let mut map: Vec<(u16, u16, String)> = client
        .cached_cluster_state()
        .map(|state| {
            state
                .slots()
                .iter()
                .map(|r| (r.start, r.end, r.primary.to_string()))
                .collect()
        })
        .unwrap_or_default();
    map.sort();
    map
}

/// Redis Cluster: reads the slot map every [`TOPOLOGY_INTERVAL`] (fred reconnects to new
/// primaries as it syncs); when any slot changed owner, every channel is subscribed
/// again — at its new owner — and checked against its history. Redis unsubscribes a
/// shard's clients itself when its slots move (`sunsubscribe`, which fred does not
/// surface), so this is what keeps a failover from leaving channels deaf.
async fn watch_topology(subscriber: Client, sink: SharedSink) {
    let mut known = slot_map(&subscriber);
    let mut tick = tokio::time::interval(TOPOLOGY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(error) = subscriber.sync_cluster().await {
            tracing::debug!(%error, "reading the Redis Cluster slot map failed; retrying");
            continue;
        }
        let now = slot_map(&subscriber);
        if now != known && !now.is_empty() {
            let owners = |m: &[(u16, u16, String)]| {
                let mut o: Vec<&str> = m.iter().map(|(_, _, p)| p.as_str()).collect();
                o.sort_unstable();
                o.dedup();
                o.join(",")
            };
            metrics::counter!(m::BROKER_TOPOLOGY_CHANGES_TOTAL).increment(1);
            tracing::warn!(
                before = %owners(&known),
                after = %owners(&now),
                "redis cluster slots changed owner; resubscribing every channel at its owner"
            );
            known = now;
            sink.reconnected();
        }
    }
}

impl RedisBroker {
    /// Runs a script by its SHA1, loading it (EVAL) when Redis does not have it yet.
    async fn script<R: FromValue>(
        &self,
        sha: &str,
        script: &str,
        key: String,
        args: Vec<Value>,
    ) -> Result<R, BrokerError> {
        let client = self.publisher.client();
        match client.evalsha(sha, key.clone(), args.clone()).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                client.eval(script, key, args).await.map_err(unavailable)
            }
            other => other.map_err(unavailable),
        }
    }

    /// Brings the subscriber connection in step: PINGs with fresh tokens until one is
    /// answered by its own PONG. A reply meant for an earlier command (left over from a
    /// refusal) is let through first by waiting, since fred drops replies that arrive
    /// with nothing waiting.
    async fn in_step(&self) -> Result<(), BrokerError> {
        for wait_ms in [0u64, 5, 20, 50, 100, 250] {
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            let token = crate::config::random_token(12);
            match self.subscriber.ping::<Value>(Some(token.clone())).await {
                Ok(reply) if pong_of(&reply, &token) => return Ok(()),
                Ok(_) | Err(_) if self.subscriber.is_connected() => continue,
                Ok(_) => break,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(BrokerError::Unavailable(
            "the subscriber connection did not answer in order".into(),
        ))
    }

    /// Connects both clients; fails if Redis cannot be reached at start.
    pub async fn connect(
        url: &str,
        probe: Duration,
        sink: SharedSink,
    ) -> Result<RedisBroker, BrokerError> {
        let subscriber = builder(url, SUBSCRIBER_BUFFER)?
            .build()
            .map_err(unavailable)?;
        let command = builder(url, 32)?.build().map_err(unavailable)?;
        // Listen before connecting so no event is missed.
        let mut messages = subscriber.message_rx();
        let mut reconnects = subscriber.reconnect_rx();
        let mut errors = subscriber.error_rx();
        subscriber.init().await.map_err(unavailable)?;
        command.init().await.map_err(unavailable)?;
        metrics::gauge!(m::BROKER_UP).set(1.0);

        let reader_sink = sink.clone();
        let topology_sink = sink.clone();
        let reader = tokio::spawn(async move {
            loop {
                match messages.recv().await {
                    Ok(message) => match message.value.as_bytes() {
                        Some(payload) => reader_sink.deliver(&message.channel, payload),
                        None => {
                            tracing::warn!(channel = %message.channel, "non-bytes pub/sub payload ignored")
                        }
                    },
                    Err(RecvError::Lagged(n)) => {
                        metrics::counter!(m::BROKER_LAGGED_MESSAGES_TOTAL).increment(n);
                        tracing::warn!(
                            skipped = n,
                            "node fell behind its Redis subscriber connection; repairing from history"
                        );
                        reader_sink.lagged();
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        });
        // The connections made by `init` (one per primary in a cluster) are not
        // reconnects: their events are dropped here; if none was queued yet, the first
        // one to come is the initial connection.
        let mut initial = 0;
        while reconnects.try_recv().is_ok() {
            initial += 1;
        }
        let events = tokio::spawn(async move {
            let mut first = initial == 0;
            loop {
                tokio::select! {
                    event = reconnects.recv() => match event {
                        Ok(server) => {
                            metrics::gauge!(m::BROKER_UP).set(1.0);
                            if first {
                                first = false;
                            } else {
                                metrics::counter!(m::BROKER_RECONNECTS_TOTAL).increment(1);
                            }
                            tracing::info!(%server, "redis subscriber connected; resubscribing");
                            sink.reconnected();
                        }
                        Err(RecvError::Lagged(_)) => sink.reconnected(),
                        Err(RecvError::Closed) => break,
                    },
                    event = errors.recv() => match event {
                        Ok((error, server)) => {
                            metrics::gauge!(m::BROKER_UP).set(0.0);
                            tracing::warn!(%error, server = ?server.map(|s| s.to_string()), "redis subscriber connection error");
                        }
                        Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => break,
                    },
                }
            }
        });
        // A subscriber connection that carries no messages can be dead without TCP
        // noticing (a frozen Redis, a dropped NAT entry): it is probed with PING, and
        // a probe unanswered in time forces a reconnect — which resubscribes and repairs.
        let prober = subscriber.clone();
        let probe_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(probe);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !prober.is_connected() {
                    continue;
                }
                // Any answer, even an error (a refusal meant for another command), shows
                // the link is alive; a closed link is fred's to reconnect. Only silence
                // is a half-dead link. In a cluster every shard's connection is probed.
                let answered = tokio::time::timeout(probe, async {
                    match prober.cached_cluster_state() {
                        Some(state) if prober.is_clustered() => {
                            for server in state.unique_primary_nodes() {
                                let _ = prober.with_cluster_node(server).ping::<Value>(None).await;
                            }
                        }
                        _ => {
                            let _ = prober.ping::<Value>(None).await;
                        }
                    }
                })
                .await;
                if answered.is_ok() {
                    continue;
                }
                metrics::counter!(m::BROKER_PROBE_FAILURES_TOTAL).increment(1);
                metrics::gauge!(m::BROKER_UP).set(0.0);
                tracing::warn!(
                    timeout_ms = probe.as_millis() as u64,
                    "redis subscriber connection did not answer its liveness probe; reconnecting"
                );
                let _ = tokio::time::timeout(probe, prober.force_reconnection()).await;
            }
        });
        let sharded = subscriber.is_clustered();
        let mut tasks = vec![reader, events, probe_task];
        if sharded {
            tasks.push(tokio::spawn(watch_topology(
                subscriber.clone(),
                topology_sink,
            )));
        }
        Ok(RedisBroker {
            subscriber,
            sharded,
            publisher: Publisher::from_client(command),
            history_sha: fred::util::sha1_hash(layout::HISTORY_SCRIPT),
            presence_refresh_sha: fred::util::sha1_hash(PRESENCE_REFRESH_SCRIPT),
            presence_prune_sha: fred::util::sha1_hash(PRESENCE_PRUNE_SCRIPT),
            tasks,
            in_order: tokio::sync::Mutex::new(()),
        })
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn is_ready(&self) -> bool {
        self.subscriber.is_connected() && self.publisher.client().is_connected()
    }

    fn subscribe_calls(&self) -> usize {
        // One subscriber connection takes them one at a time anyway (each is confirmed
        // in step); a cluster has one per primary, and a stuck shard must not hold up
        // the others.
        if self.sharded {
            16
        } else {
            1
        }
    }

    async fn subscribe(&self, channels: &[Arc<str>]) -> Result<(), BrokerError> {
        // Nothing to do (a bare SUBSCRIBE would be refused).
        if channels.is_empty() {
            return Ok(());
        }
        if self.sharded {
            // One channel per SSUBSCRIBE: channels of one command must share a slot, and
            // fred matches only the first of several confirmations to the command. fred
            // waits for each SSUBSCRIBE's own reply (following MOVED), so a success here
            // is Redis' confirmation and an error is its refusal.
            // At once, not one after another: a shard that does not answer delays only
            // the batch's answer, not its other channels' commands.
            let each = channels.iter().map(|channel| async move {
                self.subscriber
                    .ssubscribe(&**channel)
                    .await
                    .map_err(|e| unavailable(format!("SSUBSCRIBE {channel}: {e}")))
            });
            return futures_util::future::join_all(each)
                .await
                .into_iter()
                .collect();
        }
        // fred resolves SUBSCRIBE as soon as it is written; Redis' refusal (e.g.
        // NOPERM) arrives out of band and fred hands it to whatever command is waiting.
        // So the connection is first brought in step (no stale reply in flight), then a
        // PING with a fresh token follows the SUBSCRIBE: its own PONG confirms it, an
        // error is the refusal, and anything else means the answer was lost — the
        // subscription counts as failed and is retried.
        let _in_order = self.in_order.lock().await;
        self.in_step().await?;
        let keys: Vec<&str> = channels.iter().map(|c| &**c).collect();
        self.subscriber.subscribe(keys).await.map_err(unavailable)?;
        let token = crate::config::random_token(12);
        match self.subscriber.ping::<Value>(Some(token.clone())).await {
            Ok(reply) if pong_of(&reply, &token) => Ok(()),
            Ok(_) => Err(BrokerError::Unavailable(
                "SUBSCRIBE not confirmed: a stale reply arrived".into(),
            )),
            Err(e) => Err(BrokerError::Unavailable(format!(
                "SUBSCRIBE not confirmed: {e}"
            ))),
        }
    }

    async fn unsubscribe(&self, channels: &[Arc<str>]) -> Result<(), BrokerError> {
        // A bare UNSUBSCRIBE would drop every channel of the connection.
        if channels.is_empty() {
            return Ok(());
        }
        if self.sharded {
            // Every channel is tried (a failure of one leaves the others unsubscribed).
            let each = channels
                .iter()
                .map(|channel| async move { self.subscriber.sunsubscribe(&**channel).await });
            return futures_util::future::join_all(each)
                .await
                .into_iter()
                .find_map(Result::err)
                .map_or(Ok(()), |e| Err(unavailable(e)));
        }
        let _in_order = self.in_order.lock().await;
        let keys: Vec<&str> = channels.iter().map(|c| &**c).collect();
        self.subscriber.unsubscribe(keys).await.map_err(unavailable)
    }

    async fn publish(
        &self,
        channel: &str,
        event: Option<&str>,
        data: &RawValue,
        history: HistoryPolicy,
        idempotency_key: Option<&str>,
    ) -> Result<PublishAck, BrokerError> {
        // Resent through MOVED/ASK/TRYAGAIN, lost connections and timeouts until the
        // publisher's deadline, under one idempotency key: applied at most once. A
        // command client that stops answering while Redis is reachable is rebuilt.
        let key = match idempotency_key {
            Some(k) => std::borrow::Cow::Borrowed(k),
            None => std::borrow::Cow::Owned(fanout_publisher::new_idempotency_key()),
        };
        self.publisher
            .publish_with_history_key(channel, event, data, history, &key)
            .await
            .map_err(|e| match e {
                PublishError::Channel(e) => BrokerError::Invalid(e.to_string()),
                PublishError::Data(e) => BrokerError::Invalid(e.to_string()),
                e @ PublishError::Reply(_) if idempotency_key.is_some() => {
                    BrokerError::Invalid(e.to_string())
                }
                other => unavailable(other),
            })
    }

    async fn history(
        &self,
        channel: &str,
        query: HistoryQuery,
        start: Option<Duration>,
    ) -> Result<HistoryRead, BrokerError> {
        let (mode, n) = match query {
            HistoryQuery::After(after) => ("after", after),
            HistoryQuery::Last(n) => ("last", n as u64),
        };
        let keys = vec![layout::meta_key(channel), layout::history_key(channel)];
        let args: Vec<Value> = vec![
            mode.into(),
            // As text: any u64 a client sends as `since` stays exact.
            n.to_string().into(),
            (MAX_HISTORY_READ as i64).into(),
            start
                .map(|_| crate::config::random_token(12))
                .unwrap_or_default()
                .into(),
            (start.map_or(0, |t| t.as_secs().max(1)) as i64).into(),
        ];
        let client = self.publisher.client();
        let reply: Value = match client
            .evalsha(self.history_sha.as_str(), keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => client
                .eval(layout::HISTORY_SCRIPT, keys, args)
                .await
                .map_err(unavailable)?,
            other => other.map_err(unavailable)?,
        };
        parse_history(reply, matches!(query, HistoryQuery::Last(_)))
    }

    async fn broadcast_control(&self, payload: &str) -> Result<usize, BrokerError> {
        let client = self.publisher.client();
        if self.sharded {
            // Every node SSUBSCRIBEs the control channel at the shard that owns it.
            return client
                .spublish::<usize, _, _>(super::CONTROL_CHANNEL, payload)
                .await
                .map_err(unavailable);
        }
        client
            .publish::<usize, _, _>(super::CONTROL_CHANNEL, payload)
            .await
            .map_err(unavailable)
    }

    async fn report(&self, node: &str, report: &str, ttl: Duration) -> Result<(), BrokerError> {
        // One key per node with a TTL (a dead node's expires), listed in a set that
        // readers prune.
        let client = self.publisher.client();
        let key = node_key(node);
        let _: () = client
            .set(
                &key,
                report,
                Some(Expiration::PX(ttl.as_millis() as i64)),
                None,
                false,
            )
            .await
            .map_err(unavailable)?;
        let _: () = client.sadd(NODES_KEY, node).await.map_err(unavailable)?;
        Ok(())
    }

    async fn reports(&self) -> Result<Vec<String>, BrokerError> {
        let client = self.publisher.client();
        let nodes: Vec<String> = client.smembers(NODES_KEY).await.map_err(unavailable)?;
        let mut reports = Vec::with_capacity(nodes.len());
        for node in nodes {
            // One GET per node (in Redis Cluster the keys live on different slots).
            let report: Option<String> = client.get(node_key(&node)).await.map_err(unavailable)?;
            match report {
                Some(r) => reports.push(r),
                None => {
                    let _: Result<(), _> = client.srem(NODES_KEY, &node).await;
                }
            }
        }
        Ok(reports)
    }

    async fn notify(&self, channel: &str, payload: &str) -> Result<(), BrokerError> {
        let client = self.publisher.client();
        if self.sharded {
            client.spublish::<(), _, _>(channel, payload).await
        } else {
            client.publish::<(), _, _>(channel, payload).await
        }
        .map_err(unavailable)
    }

    async fn presence_refresh(
        &self,
        channel: &str,
        entries: &[(String, String)],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        // One hash per channel (hash-tagged with it): field = client, value =
        // `<expiry ms>|<info>`. Entries not refreshed in time are skipped by readers and
        // pruned; the key itself outlives its last refresh by a TTL.
        if entries.is_empty() {
            return Ok(());
        }
        let ttl_ms = ttl.as_millis() as u64;
        let until = fanout_protocol::now_ms() + ttl_ms;
        let mut args: Vec<Value> = Vec::with_capacity(2 + 2 * entries.len());
        args.push(until.to_string().into());
        args.push((2 * ttl_ms).to_string().into());
        for (client_id, info) in entries {
            args.push(client_id.as_str().into());
            args.push(info.as_str().into());
        }
        let _: Value = self
            .script(
                &self.presence_refresh_sha,
                PRESENCE_REFRESH_SCRIPT,
                layout::presence_key(channel),
                args,
            )
            .await?;
        Ok(())
    }

    async fn presence_remove(&self, channel: &str, client_id: &str) -> Result<(), BrokerError> {
        let client = self.publisher.client();
        client
            .hdel::<(), _, _>(layout::presence_key(channel), client_id)
            .await
            .map_err(unavailable)
    }

    async fn presence(&self, channel: &str) -> Result<Vec<String>, BrokerError> {
        let client = self.publisher.client();
        let key = layout::presence_key(channel);
        let entries: std::collections::HashMap<String, String> =
            client.hgetall(&key).await.map_err(unavailable)?;
        let now = fanout_protocol::now_ms();
        let mut live = Vec::with_capacity(entries.len());
        let mut expired = Vec::new();
        for (client_id, value) in entries {
            match value.split_once('|') {
                Some((until, info)) if until.parse::<u64>().is_ok_and(|u| u > now) => {
                    live.push(info.to_string())
                }
                _ => expired.push(client_id),
            }
        }
        if !expired.is_empty() {
            // Left by a node that died: pruned by whoever reads first (each entry
            // checked again as it is deleted, so a refresh in between is kept).
            let _ = self.presence_prune(channel, &expired).await;
        }
        Ok(live)
    }

    async fn presence_prune(
        &self,
        channel: &str,
        clients: &[String],
    ) -> Result<usize, BrokerError> {
        if clients.is_empty() {
            return Ok(0);
        }
        let mut args: Vec<Value> = Vec::with_capacity(1 + clients.len());
        args.push(fanout_protocol::now_ms().to_string().into());
        args.extend(clients.iter().map(|c| Value::from(c.as_str())));
        self.script(
            &self.presence_prune_sha,
            PRESENCE_PRUNE_SCRIPT,
            layout::presence_key(channel),
            args,
        )
        .await
    }

    async fn shutdown(&self) {
        let _ = self.subscriber.quit().await;
        let _ = self.publisher.client().quit().await;
        for t in &self.tasks {
            t.abort();
        }
    }
}
