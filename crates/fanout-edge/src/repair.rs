//! Gap repair on the node. The hub tracks the last offset it dispatched per channel; a
//! gap in live offsets, a pub/sub reconnect or a resubscribe asks for a repair here. One
//! worker reads each such channel's history after its position and hands it back to the
//! hub, which delivers what its subscribers missed — or, when history no longer covers
//! the gap, tells them `recovered:false` with the new position. A failed read (Redis
//! down) is retried with capped exponential backoff; meanwhile the channel's live
//! messages are held, in order, so nothing is dispatched out of order.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, HistoryQuery};
use crate::config::Settings;
use crate::hub::{Delivery, Hub};
use crate::metrics as m;
use crate::upstream::Upstream;

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Asks the repair worker to check a channel against its history.
#[derive(Clone)]
pub struct Repairs {
    tx: mpsc::UnboundedSender<Arc<str>>,
}

impl Repairs {
    pub(crate) fn channel() -> (Repairs, mpsc::UnboundedReceiver<Arc<str>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Repairs { tx }, rx)
    }

    pub fn request(&self, channel: &str) {
        let _ = self.tx.send(Arc::from(channel));
    }
}

/// Books what a delivery or a repair did: metrics, and the broker references of
/// subscriptions that ended (finished jobs).
pub(crate) fn account(upstream: &Upstream, channel: &str, d: &Delivery) {
    if d.queued > 0 {
        metrics::counter!(m::DELIVERIES_TOTAL).increment(d.queued as u64);
    }
    if d.duplicates > 0 {
        metrics::counter!(m::DUPLICATES_DROPPED_TOTAL).increment(d.duplicates as u64);
    }
    if d.repaired > 0 {
        metrics::counter!(m::REPAIRED_MESSAGES_TOTAL).increment(d.repaired as u64);
    }
    if d.ended > 0 {
        metrics::counter!(m::JOBS_COMPLETED_TOTAL).increment(d.ended as u64);
        let channel: Arc<str> = Arc::from(channel);
        for _ in 0..d.ended {
            upstream.release(channel.clone());
        }
    }
}

/// The worker: one repair loop per channel at a time, until `stop`.
pub(crate) async fn run(
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    settings: Arc<Settings>,
    upstream: Upstream,
    mut rx: mpsc::UnboundedReceiver<Arc<str>>,
    stop: CancellationToken,
) {
    // Channels under repair, each with whether it was asked for again meanwhile (a
    // reconnect after the running read began): then it runs once more.
    let running: Arc<std::sync::Mutex<HashMap<Arc<str>, bool>>> = Arc::default();
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let channel = tokio::select! {
            _ = stop.cancelled() => break,
            c = rx.recv() => match c {
                Some(c) => c,
                None => break,
            },
        };
        {
            let mut running = running.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(again) = running.get_mut(&channel) {
                *again = true;
                continue;
            }
            running.insert(channel.clone(), false);
        }
        let (hub, broker, settings, upstream, running, stop) = (
            hub.clone(),
            broker.clone(),
            settings.clone(),
            upstream.clone(),
            running.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = repair(&hub, broker.as_ref(), &settings, &upstream, &channel) => {}
                }
                let mut running = running.lock().unwrap_or_else(PoisonError::into_inner);
                let again = running
                    .get_mut(&channel)
                    .map(std::mem::take)
                    .unwrap_or(false);
                // Asked again, or a gap found while this repair was finishing.
                if !again && !hub.needs_repair(&channel) {
                    running.remove(&channel);
                    return;
                }
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

/// Repairs `channel` until its stream is contiguous again (or it has no subscribers).
async fn repair(
    hub: &Hub,
    broker: &dyn Broker,
    settings: &Settings,
    upstream: &Upstream,
    channel: &str,
) {
    // History lost (Redis restarted empty): the channel starts again at a new epoch, so
    // that the subscribers told `recovered:false` get a position to recover from.
    let start = settings
        .namespaces
        .parse(channel)
        .ok()
        .map(|c| settings.namespaces.for_channel(&c).history.ttl);
    let mut backoff = RETRY_MIN;
    // Since when reads have kept failing.
    let mut failing: Option<std::time::Instant> = None;
    loop {
        let Some(position) = hub.begin_repair(channel) else {
            // Nobody there any more, no position to repair from, or already repairing.
            return;
        };
        let read = match broker
            .history(channel, HistoryQuery::After(position.offset), start)
            .await
        {
            Ok(read) => Some(read),
            Err(error) => {
                metrics::counter!(m::BROKER_ERRORS_TOTAL, "op" => "history").increment(1);
                tracing::warn!(%channel, %error, "gap repair: history read failed; retrying");
                None
            }
        };
        let failed = read.is_none();
        let mut d = hub.finish_repair(channel, read);
        if failed {
            let since = *failing.get_or_insert_with(std::time::Instant::now);
            if d.repair && since.elapsed() >= settings.limits.repair_timeout() {
                // History stays out of reach: the subscribers are told they may have
                // missed messages, instead of the channel being held for ever.
                d = hub.abandon_repair(channel);
                failing = None;
                metrics::counter!(m::GAP_REPAIRS_TOTAL, "outcome" => "abandoned").increment(1);
                tracing::warn!(
                    %channel,
                    after = position.offset,
                    delivered = d.queued,
                    "gap repair given up: history unreadable for {} s; subscribers told recovered:false",
                    settings.limits.repair_timeout().as_secs()
                );
                account(upstream, channel, &d);
                if !d.repair {
                    return;
                }
                continue;
            }
        } else {
            failing = None;
        }
        if d.repaired > 0 || d.reset {
            metrics::counter!(m::GAP_REPAIRS_TOTAL, "outcome" => if d.reset { "reset" } else { "repaired" })
                .increment(1);
            tracing::info!(
                %channel,
                after = position.offset,
                repaired = d.repaired,
                reset = d.reset,
                "gap repair"
            );
        }
        account(upstream, channel, &d);
        if !d.repair {
            return;
        }
        if failed {
            // Jittered, so that many nodes do not retry in step.
            let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 2);
            tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
            backoff = (backoff * 2).min(RETRY_MAX);
        } else {
            backoff = RETRY_MIN;
        }
    }
}
