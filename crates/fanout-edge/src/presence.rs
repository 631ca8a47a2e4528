//! Presence: who is subscribed to a channel, across every node. For namespaces with
//! `presence = true` each subscription is recorded in the broker (Redis: one hash per
//! channel, `fanout:{C}:presence`) with an expiry the node refreshes every third of
//! `--presence-ttl-secs`; a node that dies stops refreshing, so its clients drop out
//! within the TTL. With `join_leave = true` subscribers also get `join` / `leave`
//! frames, sent as offset-less notices on the channel itself. The clients of a node that
//! dies leave presence silently (no `leave` frame) when their entries expire.
//!
//! Every broker write goes through one task per node, in order, so that a quick
//! subscribe/unsubscribe can never leave a stale entry behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fanout_protocol::{Envelope, Notice};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::broker::{Broker, BrokerError};
use crate::metrics as m;

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

/// (channel, client) → (info JSON, join_leave)
type Entries = HashMap<(Arc<str>, String), (String, bool)>;

/// A node's presence entries and the task that writes them.
pub struct Presence {
    broker: Arc<dyn Broker>,
    ttl: Duration,
    local: Mutex<Entries>,
    tx: mpsc::UnboundedSender<Op>,
}

impl Presence {
    /// Starts the writer task (stopped by [`close`](Self::close)).
    pub fn start(broker: Arc<dyn Broker>, ttl: Duration) -> Arc<Presence> {
        let (tx, rx) = mpsc::unbounded_channel();
        let presence = Arc::new(Presence {
            broker,
            ttl,
            local: Mutex::new(HashMap::new()),
            tx,
        });
        tokio::spawn(writer(Arc::downgrade(&presence), rx, ttl));
        presence
    }

    /// `client` subscribed to `channel`.
    pub fn join(&self, channel: Arc<str>, client: &str, info: String, notify: bool) {
        self.local.lock().unwrap_or_else(|p| p.into_inner()).insert(
            (channel.clone(), client.to_string()),
            (info.clone(), notify),
        );
        let _ = self.tx.send(Op::Set {
            channel,
            client: client.to_string(),
            info,
            notify,
        });
    }

    /// `client` left `channel` (no-op if it was not recorded).
    pub fn leave(&self, channel: &Arc<str>, client: &str) {
        let removed = self
            .local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(channel.clone(), client.to_string()));
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

    /// Writes what is queued (the leaves of connections closed at shutdown), then stops
    /// the writer; waits at most 3 s.
    pub async fn close(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Op::Close(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(3), rx).await;
        }
    }

    /// Entries this node holds.
    pub fn local_len(&self) -> usize {
        self.local.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

async fn writer(
    presence: std::sync::Weak<Presence>,
    mut rx: mpsc::UnboundedReceiver<Op>,
    ttl: Duration,
) {
    let mut refresh = tokio::time::interval(ttl / 3);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            op = rx.recv() => {
                let (Some(op), Some(p)) = (op, presence.upgrade()) else { break };
                if let Op::Close(done) = op {
                    let _ = done.send(());
                    break;
                }
                apply(&p, op).await;
            }
            _ = refresh.tick() => {
                let Some(p) = presence.upgrade() else { break };
                let entries: Vec<(Arc<str>, String, String)> = p
                    .local
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|((c, id), (info, _))| (c.clone(), id.clone(), info.clone()))
                    .collect();
                for (channel, client, info) in entries {
                    if let Err(error) = p.broker.presence_set(&channel, &client, &info, ttl).await {
                        metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "presence").increment(1);
                        tracing::warn!(%channel, %error, "presence refresh failed");
                        break;
                    }
                }
            }
        }
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
            let r = p.broker.presence_set(&channel, &client, &info, p.ttl).await;
            (channel, r, notify.then_some((Notice::Join, info)))
        }
        Op::Remove {
            channel,
            client,
            info,
            notify,
        } => {
            let r = p.broker.presence_remove(&channel, &client).await;
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
