//! The non-blocking publisher for job loops: the caller serializes and enqueues; a
//! background task publishes, in order, each message under its own idempotency key and
//! with the publisher's retries (through failovers and slot moves, until the retry
//! deadline; applied at most once). A full queue or a Redis that stays away past the
//! deadline never blocks or fails the caller — the message is dropped, counted and logged
//! (the first drop of a burst at `warn`, then every 1000th).

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::{completion_data, job_channel, progress_data, JobStatus, Publisher};

struct Item {
    channel: String,
    event: Option<String>,
    data: Box<RawValue>,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    dropped: AtomicU64,
}

/// A cheap-to-clone handle; see [`Publisher::background`].
#[derive(Clone)]
pub struct BackgroundPublisher {
    tx: mpsc::Sender<Item>,
    counters: Arc<Counters>,
}

impl BackgroundPublisher {
    pub(crate) fn spawn(publisher: Publisher, capacity: usize) -> BackgroundPublisher {
        let (tx, mut rx) = mpsc::channel::<Item>(capacity.max(1));
        let counters = Arc::new(Counters::default());
        let task_counters = counters.clone();
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                match publisher
                    .publish_raw(&item.channel, item.event.as_deref(), &item.data)
                    .await
                {
                    Ok(_) => {
                        task_counters.published.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => {
                        let n = task_counters.dropped.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("fanout_publisher_dropped_total", "reason" => "redis_error")
                            .increment(1);
                        if n % 1000 == 0 {
                            tracing::warn!(channel = %item.channel, %error, dropped_total = n + 1, "background publish failed; message dropped");
                        }
                    }
                }
            }
        });
        BackgroundPublisher { tx, counters }
    }

    /// Enqueues a publish. Returns `false` if it was dropped (queue full, or data that
    /// does not serialize).
    pub fn publish<T: Serialize + ?Sized>(&self, channel: &str, event: &str, data: &T) -> bool {
        let data = match serde_json::value::to_raw_value(data) {
            Ok(d) => d,
            Err(error) => {
                self.drop_one("serialize", channel, &error);
                return false;
            }
        };
        let item = Item {
            channel: channel.to_string(),
            event: (!event.is_empty()).then(|| event.to_string()),
            data,
        };
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(error) => {
                self.drop_one("queue_full", channel, &error);
                false
            }
        }
    }

    /// Enqueues a job progress update; see [`Publisher::job_progress`].
    pub fn job_progress(&self, job_id: impl Display, pct: f64, message: Option<&str>) -> bool {
        self.publish(
            &job_channel(job_id),
            "progress",
            &progress_data(pct, message),
        )
    }

    /// Enqueues a job completion; see [`Publisher::job_completed`].
    pub fn job_completed<T: Serialize + ?Sized>(
        &self,
        job_id: impl Display,
        status: JobStatus,
        result: &T,
    ) -> bool {
        match completion_data(status, result) {
            Ok(data) => self.publish(&job_channel(job_id), "completed", &data),
            Err(error) => {
                self.drop_one("serialize", &job_channel(job_id), &error);
                false
            }
        }
    }

    /// Messages published so far.
    pub fn published(&self) -> u64 {
        self.counters.published.load(Ordering::Relaxed)
    }

    /// Messages dropped so far (queue full, serialization, Redis errors).
    pub fn dropped(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Waits until everything enqueued so far was handled, or `timeout` passed. Returns
    /// whether the queue drained.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.tx.capacity() < self.tx.max_capacity() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    fn drop_one(&self, reason: &'static str, channel: &str, error: &dyn std::fmt::Display) {
        let n = self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("fanout_publisher_dropped_total", "reason" => reason).increment(1);
        if n % 1000 == 0 {
            tracing::warn!(%channel, reason, %error, dropped_total = n + 1, "background publish dropped");
        }
    }
}
