//! Presence: who is subscribed to a channel, across every node. For namespaces with
//! `presence = true` each subscription is recorded in the broker (Redis: one hash per
//! channel, `fanout:{C}:presence`) with an expiry the node refreshes every third of
//! `--presence-ttl-secs`; a node that dies stops refreshing, so its clients drop out
//! within the TTL. With `join_leave = true` subscribers also get `join` / `leave`
//! frames, sent as offset-less notices on the channel itself. The clients of a node that
//! dies leave presence silently (no `leave` frame) when their entries expire.
//!
//! Two tasks write to the broker:
//! - the **writer** carries joins and leaves, one at a time and in order, so that a quick
//!   subscribe/unsubscribe can never leave a stale entry behind;
//! - the **refresher** rewrites every entry of this node every third of the TTL, one
//!   broker call per channel (per [`REFRESH_BATCH`] entries), [`REFRESH_CONCURRENCY`]
//!   channels at a time. A channel that fails is counted, the others go on, and the
//!   next sweep retries it.
//!
//! The two never write the same entry out of order: the refresher reads a batch's
//! entries from the node's own map and writes them under a shared hold of `order`,
//! the writer takes it exclusively for each write. A leave takes its entry out of the
//! map before its removal is queued, so a batch either no longer has it or is written
//! before the removal is. A join never waits for more than the batches in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fanout_protocol::{Envelope, Notice};
use futures_util::StreamExt;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, RwLock};
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerError};
use crate::metrics as m;

/// The most entries one refresh call writes (Redis: one script call); a channel with
/// more takes several.
pub const REFRESH_BATCH: usize = 1000;

/// Channels refreshed at the same time.
pub const REFRESH_CONCURRENCY: usize = 8;

enum Op {
    Set {
        channel: Arc<str>,
        client: String,
        info: String,
        notify: bool,
    },
    Remove {
        channel: Arc<str>,
        client: String,
        info: String,
        notify: bool,
    },
    /// Everything queued before it is written; then the writer stops.
    Close(tokio::sync::oneshot::Sender<()>),
}

/// channel → client → (info JSON, join_leave)
type Entries = HashMap<Arc<str>, HashMap<String, (String, bool)>>;

/// A node's presence entries and the tasks that write them.
pub struct Presence {
    broker: Arc<dyn Broker>,
    ttl: Duration,
    local: Mutex<Entries>,
    tx: mpsc::UnboundedSender<Op>,
    /// Shared by refresh batches, exclusive for each join/leave write (see the module
    /// doc).
    order: RwLock<()>,
    /// Stops the refresher.
    stop: CancellationToken,
}

/// What one refresh sweep did.
#[derive(Debug, Default)]
struct Sweep {
    channels: usize,
    entries: usize,
    /// Broker calls made (one per channel, or per [`REFRESH_BATCH`] entries).
    calls: usize,
    /// Channels not refreshed, with their error.
    failed: Vec<(Arc<str>, BrokerError)>,
}

impl Presence {
    /// Starts the writer and the refresher (stopped by [`close`](Self::close)).
    pub fn start(broker: Arc<dyn Broker>, ttl: Duration) -> Arc<Presence> {
        let (tx, rx) = mpsc::unbounded_channel();
        let presence = Arc::new(Presence {
            broker,
            ttl,
            local: Mutex::new(HashMap::new()),
            tx,
            order: RwLock::new(()),
            stop: CancellationToken::new(),
        });
        tokio::spawn(writer(Arc::downgrade(&presence), rx));
        tokio::spawn(refresher(
            Arc::downgrade(&presence),
            presence.stop.clone(),
            ttl / 3,
        ));
        presence
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `client` subscribed to `channel`.
    pub fn join(&self, channel: Arc<str>, client: &str, info: String, notify: bool) {
        self.local()
            .entry(channel.clone())
            .or_default()
            .insert(client.to_string(), (info.clone(), notify));
        let _ = self.tx.send(Op::Set {
            channel,
            client: client.to_string(),
            info,
            notify,
        });
    }

    /// `client` left `channel` (no-op if it was not recorded).
    pub fn leave(&self, channel: &Arc<str>, client: &str) {
        let removed = {
            let mut local = self.local();
            let removed = local.get_mut(channel).and_then(|c| c.remove(client));
            if local.get(channel).is_some_and(|c| c.is_empty()) {
                local.remove(channel);
            }
            removed
        };
        if let Some((info, notify)) = removed {
            let _ = self.tx.send(Op::Remove {
                channel: channel.clone(),
                client: client.to_string(),
                info,
                notify,
            });
        }
    }

    /// Everyone present on `channel`, on every node, ordered by client id.
    pub async fn list(&self, channel: &str) -> Result<Vec<serde_json::Value>, BrokerError> {
        let mut clients: Vec<serde_json::Value> = self
            .broker
            .presence(channel)
            .await?
            .iter()
            .filter_map(|info| serde_json::from_str(info).ok())
            .collect();
        clients.sort_by(|a, b| a["client"].as_str().cmp(&b["client"].as_str()));
        Ok(clients)
    }

    /// Stops refreshing, writes what is queued (the leaves of connections closed at
    /// shutdown), then stops the writer; waits at most 3 s.
    pub async fn close(&self) {
        self.stop.cancel();
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Op::Close(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(3), rx).await;
        }
    }

    /// Entries this node holds.
    pub fn local_len(&self) -> usize {
        self.local().values().map(HashMap::len).sum()
    }

    /// Rewrites every entry of this node with a new expiry: one broker call per
    /// channel (per [`REFRESH_BATCH`] entries), [`REFRESH_CONCURRENCY`] channels at a
    /// time; a failed channel does not stop the others.
    async fn sweep(&self) -> Sweep {
        let channels: Vec<(Arc<str>, Vec<String>)> = self
            .local()
            .iter()
            .map(|(c, clients)| (c.clone(), clients.keys().cloned().collect()))
            .collect();
        let mut sweep = Sweep {
            channels: channels.len(),
            ..Sweep::default()
        };
        let mut results = futures_util::stream::iter(channels)
            .map(|(channel, clients)| self.refresh_channel(channel, clients))
            .buffer_unordered(REFRESH_CONCURRENCY);
        while let Some((channel, entries, calls, result)) = results.next().await {
            sweep.entries += entries;
            sweep.calls += calls;
            if let Err(error) = result {
                sweep.failed.push((channel, error));
            }
        }
        sweep
    }

    /// Refreshes `clients` of `channel` (those still joined when their batch is
    /// written); returns the entries written, the calls made and the outcome. Stops at
    /// the channel's first failed call.
    async fn refresh_channel(
        &self,
        channel: Arc<str>,
        clients: Vec<String>,
    ) -> (Arc<str>, usize, usize, Result<(), BrokerError>) {
        let (mut entries, mut calls) = (0, 0);
        for batch in clients.chunks(REFRESH_BATCH) {
            let _order = self.order.read().await;
            // Read under the hold: a client that left since the sweep began is not
            // written back, and one that leaves from now on is removed after this call.
            let current: Vec<(String, String)> = {
                let local = self.local();
                let Some(joined) = local.get(&channel) else {
                    break;
                };
                batch
                    .iter()
                    .filter_map(|c| joined.get(c).map(|(info, _)| (c.clone(), info.clone())))
                    .collect()
            };
            if current.is_empty() {
                continue;
            }
            calls += 1;
            if let Err(error) = self
                .broker
                .presence_refresh(&channel, &current, self.ttl)
                .await
            {
                return (channel, entries, calls, Err(error));
            }
            entries += current.len();
        }
        (channel, entries, calls, Ok(()))
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Joins and leaves, in order.
async fn writer(presence: Weak<Presence>, mut rx: mpsc::UnboundedReceiver<Op>) {
    while let Some(op) = rx.recv().await {
        if let Op::Close(done) = op {
            let _ = done.send(());
            break;
        }
        let Some(p) = presence.upgrade() else { break };
        apply(&p, op).await;
    }
}

/// A refresh sweep every `period` (a third of the TTL) until stopped; a sweep that
/// outlasts the period delays the next one rather than piling up.
async fn refresher(presence: Weak<Presence>, stop: CancellationToken, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Some(p) = presence.upgrade() else { break };
        let started = Instant::now();
        let sweep = tokio::select! {
            _ = stop.cancelled() => break,
            sweep = p.sweep() => sweep,
        };
        let took = started.elapsed();
        metrics::histogram!(m::PRESENCE_REFRESH_SECONDS).record(took.as_secs_f64());
        if sweep.failed.is_empty() {
            tracing::debug!(
                channels = sweep.channels,
                entries = sweep.entries,
                calls = sweep.calls,
                took_ms = took.as_millis() as u64,
                "presence refreshed"
            );
            continue;
        }
        // One line per sweep, however many channels failed.
        let failed = sweep.failed.len() as u64;
        metrics::counter!(m::PRESENCE_REFRESH_ERRORS_TOTAL).increment(failed);
        metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "presence").increment(failed);
        let examples: Vec<&str> = sweep.failed.iter().take(5).map(|(c, _)| &**c).collect();
        tracing::warn!(
            failed_channels = failed,
            channels = sweep.channels,
            entries_refreshed = sweep.entries,
            calls = sweep.calls,
            took_ms = took.as_millis() as u64,
            examples = %examples.join(","),
            error = %sweep.failed[0].1,
            "presence refresh failed for some channels; they are retried next sweep"
        );
    }
}

async fn apply(p: &Presence, op: Op) {
    let (channel, result, notice) = match op {
        Op::Set {
            channel,
            client,
            info,
            notify,
        } => {
            let r = {
                let _order = p.order.write().await;
                p.broker.presence_set(&channel, &client, &info, p.ttl).await
            };
            (channel, r, notify.then_some((Notice::Join, info)))
        }
        Op::Remove {
            channel,
            client,
            info,
            notify,
        } => {
            let r = {
                let _order = p.order.write().await;
                p.broker.presence_remove(&channel, &client).await
            };
            (channel, r, notify.then_some((Notice::Leave, info)))
        }
        Op::Close(_) => return,
    };
    if let Err(error) = result {
        // A missed set is written by the next refresh; a missed remove expires.
        metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "presence").increment(1);
        tracing::warn!(%channel, %error, "presence update failed");
    }
    if let Some((notice, info)) = notice {
        let Ok(raw) = RawValue::from_string(info) else {
            return;
        };
        let payload = Envelope::encode_notice(notice, &raw, fanout_protocol::now_ms());
        if let Err(error) = p.broker.notify(&channel, &payload).await {
            metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "notify").increment(1);
            tracing::warn!(%channel, %error, "join/leave notice not sent");
        }
    }
}
