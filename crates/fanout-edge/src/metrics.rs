//! Every metric of the edge: names, units and help text declared once here and
//! described at start; call sites use these constants. Prometheus naming: counters end
//! in `_total`, durations are `_seconds`.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "fanout_connections";
pub const CONNECTIONS_TOTAL: &str = "fanout_connections_total";
pub const DISCONNECTS_TOTAL: &str = "fanout_disconnects_total";
pub const AUTH_FAILURES_TOTAL: &str = "fanout_auth_failures_total";
pub const CLIENT_FRAMES_TOTAL: &str = "fanout_client_frames_total";
pub const CLIENT_ERRORS_TOTAL: &str = "fanout_client_errors_total";
pub const SUBSCRIPTIONS: &str = "fanout_subscriptions";
pub const CHANNELS: &str = "fanout_channels";
pub const BROKER_MESSAGES_TOTAL: &str = "fanout_broker_messages_total";
pub const DELIVERIES_TOTAL: &str = "fanout_deliveries_total";
pub const SLOW_CONSUMER_CLOSES_TOTAL: &str = "fanout_slow_consumer_closes_total";
pub const BROKER_LAGGED_MESSAGES_TOTAL: &str = "fanout_broker_lagged_messages_total";
pub const BROKER_RECONNECTS_TOTAL: &str = "fanout_broker_reconnects_total";
pub const BROKER_ERRORS_TOTAL: &str = "fanout_broker_errors_total";
pub const BROKER_UP: &str = "fanout_broker_up";
pub const PUBLISHES_TOTAL: &str = "fanout_publishes_total";
pub const PUBSUB_LAG_SECONDS: &str = "fanout_pubsub_lag_seconds";
pub const BROKER_SUBSCRIBE_SECONDS: &str = "fanout_broker_subscribe_seconds";
pub const API_REQUESTS_TOTAL: &str = "fanout_api_requests_total";
pub const CLIENT_HTTP_REQUESTS_TOTAL: &str = "fanout_client_http_requests_total";
pub const INTERNAL_ERRORS_TOTAL: &str = "fanout_internal_errors_total";
pub const RECOVERIES_TOTAL: &str = "fanout_recoveries_total";
pub const GAP_REPAIRS_TOTAL: &str = "fanout_gap_repairs_total";
pub const REPAIRED_MESSAGES_TOTAL: &str = "fanout_repaired_messages_total";
pub const DUPLICATES_DROPPED_TOTAL: &str = "fanout_duplicates_dropped_total";
pub const HELD_OVERFLOW_TOTAL: &str = "fanout_repair_hold_overflow_total";
pub const JOBS_COMPLETED_TOTAL: &str = "fanout_job_subscriptions_completed_total";
pub const CONFLATED_MESSAGES_TOTAL: &str = "fanout_conflated_messages_total";
pub const OUTBOUND_QUEUE_BYTES: &str = "fanout_outbound_queue_bytes";
pub const BROKER_PROBE_FAILURES_TOTAL: &str = "fanout_broker_probe_failures_total";
pub const BROKER_TOPOLOGY_CHANGES_TOTAL: &str = "fanout_broker_topology_changes_total";
pub const DRAINING: &str = "fanout_draining";
pub const DRAIN_CLOSES_TOTAL: &str = "fanout_drain_closes_total";
pub const SUBSCRIPTIONS_REVOKED_TOTAL: &str = "fanout_subscriptions_revoked_total";
pub const CONNECTIONS_REFUSED_TOTAL: &str = "fanout_connections_refused_total";
pub const PENDING_AUTH_CONNECTIONS: &str = "fanout_pending_auth_connections";
pub const PRESENCE_REFRESH_SECONDS: &str = "fanout_presence_refresh_seconds";
pub const PRESENCE_REFRESH_ERRORS_TOTAL: &str = "fanout_presence_refresh_errors_total";
// Emitted by the publisher (`fanout-publisher`) that the Redis broker publishes through.
pub const PUBLISH_RETRIES_TOTAL: &str = fanout_publisher::metric_names::RETRIES_TOTAL;
pub const PUBLISH_DUPLICATES_TOTAL: &str = fanout_publisher::metric_names::DUPLICATES_TOTAL;
pub const PUBLISH_CLIENT_REBUILDS_TOTAL: &str =
    fanout_publisher::metric_names::CLIENT_REBUILDS_TOTAL;
pub const PUBLISH_FAILED_TOTAL: &str = fanout_publisher::metric_names::FAILED_TOTAL;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder once per process (several nodes in one test process
/// share it) and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(PUBSUB_LAG_SECONDS.into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(BROKER_SUBSCRIBE_SECONDS.into()),
                        &[
                            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                            5.0,
                        ],
                    )
                })
                .and_then(|b| {
                    // A sweep must finish well within a third of the presence TTL
                    // (3–3600 s).
                    b.set_buckets_for_metric(
                        Matcher::Full(PRESENCE_REFRESH_SECONDS.into()),
                        &[
                            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                            30.0,
                        ],
                    )
                })
                .expect("bucket lists are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            handle
        })
        .clone()
}

fn describe() {
    // Labelled counters exist from the start at 0, so that `increase()` and `rate()` see
    // their first event (a series born at 1 looks like no increase).
    for (name, label, values) in [
        (
            RECOVERIES_TOTAL,
            "outcome",
            &["recovered", "not_recovered"][..],
        ),
        (
            GAP_REPAIRS_TOTAL,
            "outcome",
            &["repaired", "reset", "abandoned"][..],
        ),
        (
            SLOW_CONSUMER_CLOSES_TOTAL,
            "limit",
            &["messages", "bytes", "replay", "stall"][..],
        ),
        (
            INTERNAL_ERRORS_TOTAL,
            "place",
            &["control", "deliver", "session", "subscriptions"][..],
        ),
        (
            CONNECTIONS_REFUSED_TOTAL,
            "limit",
            &[
                "connections",
                "pending_auth",
                "per_ip",
                "per_user",
                "origin",
            ][..],
        ),
        (PUBLISH_FAILED_TOTAL, "reason", &["gave_up", "error"][..]),
    ] {
        for value in values {
            metrics::counter!(name, label => *value).increment(0);
        }
    }
    metrics::counter!(PRESENCE_REFRESH_ERRORS_TOTAL).increment(0);
    describe_gauge!(
        CONNECTIONS,
        Unit::Count,
        "WebSocket connections open on this node."
    );
    describe_counter!(
        CONNECTIONS_TOTAL,
        Unit::Count,
        "WebSocket connections accepted."
    );
    describe_counter!(
        DISCONNECTS_TOTAL,
        Unit::Count,
        "Connections ended, by close code (`none` = the peer vanished)."
    );
    describe_counter!(
        AUTH_FAILURES_TOTAL,
        Unit::Count,
        "Refused tokens, by reason."
    );
    describe_counter!(
        CLIENT_FRAMES_TOTAL,
        Unit::Count,
        "Client frames handled, by type."
    );
    describe_counter!(
        CLIENT_ERRORS_TOTAL,
        Unit::Count,
        "Error frames sent to clients, by code."
    );
    describe_gauge!(
        SUBSCRIPTIONS,
        Unit::Count,
        "Client subscriptions on this node."
    );
    describe_gauge!(
        CHANNELS,
        Unit::Count,
        "Channels this node is subscribed to at the broker."
    );
    describe_counter!(
        BROKER_MESSAGES_TOTAL,
        Unit::Count,
        "Messages received from the broker."
    );
    describe_counter!(
        DELIVERIES_TOTAL,
        Unit::Count,
        "Messages queued to client sockets."
    );
    describe_counter!(
        SLOW_CONSUMER_CLOSES_TOTAL,
        Unit::Count,
        "Connections closed with 4009 because their queue was full, by the limit hit (messages, bytes)."
    );
    describe_counter!(
        BROKER_LAGGED_MESSAGES_TOTAL,
        Unit::Count,
        "Broker messages skipped because the node fell behind its subscriber connection."
    );
    describe_counter!(
        BROKER_RECONNECTS_TOTAL,
        Unit::Count,
        "Reconnections to the broker (Redis)."
    );
    describe_counter!(
        BROKER_ERRORS_TOTAL,
        Unit::Count,
        "Broker command failures, by operation."
    );
    describe_gauge!(BROKER_UP, Unit::Count, "1 while the broker is connected.");
    describe_counter!(
        PUBLISHES_TOTAL,
        Unit::Count,
        "Publishes made through this node, by source (api, client)."
    );
    describe_histogram!(
        PUBSUB_LAG_SECONDS,
        Unit::Seconds,
        "Time from publish (`ts`) to dispatch on this node."
    );
    describe_histogram!(
        BROKER_SUBSCRIBE_SECONDS,
        Unit::Seconds,
        "Time to subscribe a batch of channels at the broker."
    );
    describe_counter!(
        RECOVERIES_TOTAL,
        Unit::Count,
        "Subscribes with `since`, by outcome (recovered, not_recovered)."
    );
    describe_counter!(
        GAP_REPAIRS_TOTAL,
        Unit::Count,
        "Gap repairs that changed something, by outcome (repaired: missed messages delivered; reset: history could not cover the gap, subscribers told recovered:false; abandoned: history stayed unreadable for limits.repair_timeout_secs, subscribers told recovered:false)."
    );
    describe_counter!(
        REPAIRED_MESSAGES_TOTAL,
        Unit::Count,
        "Messages delivered from history by gap repairs."
    );
    describe_counter!(
        DUPLICATES_DROPPED_TOTAL,
        Unit::Count,
        "Messages with an offset already delivered, dropped."
    );
    describe_counter!(
        HELD_OVERFLOW_TOTAL,
        Unit::Count,
        "Messages dropped from a channel's repair hold because it was full."
    );
    describe_counter!(
        JOBS_COMPLETED_TOTAL,
        Unit::Count,
        "Job subscriptions ended by a terminal status."
    );
    describe_counter!(
        CONFLATED_MESSAGES_TOTAL,
        Unit::Count,
        "Queued messages replaced by a newer one of the same channel (conflating namespaces)."
    );
    describe_gauge!(
        OUTBOUND_QUEUE_BYTES,
        Unit::Bytes,
        "Bytes waiting in the outbound queues of all connections."
    );
    describe_counter!(
        BROKER_PROBE_FAILURES_TOTAL,
        Unit::Count,
        "Liveness probes of the Redis subscriber connection that failed or timed out (each forces a reconnect)."
    );
    describe_counter!(
        BROKER_TOPOLOGY_CHANGES_TOTAL,
        Unit::Count,
        "Redis Cluster slot-to-primary changes seen (failover, resharding); each resubscribes every channel at its new owner and checks it against history."
    );
    describe_gauge!(
        DRAINING,
        Unit::Count,
        "1 while the node drains (after SIGTERM): not ready, closing its connections."
    );
    describe_counter!(
        DRAIN_CLOSES_TOTAL,
        Unit::Count,
        "Connections closed with 1001 by a paced drain."
    );
    describe_counter!(
        SUBSCRIPTIONS_REVOKED_TOTAL,
        Unit::Count,
        "Upstream ended with `unsubscribed {reason:\"forbidden\"}` because a refreshed token no longer grants the channel."
    );
    describe_counter!(
        CONNECTIONS_REFUSED_TOTAL,
        Unit::Count,
        "Connections refused by a limit, by limit (connections: node full, 1013; pending_auth: too many unauthenticated sockets, 1013; per_ip: 4008; per_user: 4008; origin: 1008)."
    );
    describe_gauge!(
        PENDING_AUTH_CONNECTIONS,
        Unit::Count,
        "Upgraded sockets that have not authenticated yet."
    );
    describe_counter!(
        INTERNAL_ERRORS_TOTAL,
        Unit::Count,
        "Bugs caught at run time (a contained panic), by place; each is also logged at error."
    );
    describe_histogram!(
        PRESENCE_REFRESH_SECONDS,
        Unit::Seconds,
        "Time one presence refresh sweep took (every entry of this node rewritten, one broker call per channel)."
    );
    describe_counter!(
        PRESENCE_REFRESH_ERRORS_TOTAL,
        Unit::Count,
        "Channels whose presence refresh failed (retried by the next sweep; each failing sweep also logs one warn line)."
    );
    for name in [
        PUBLISH_RETRIES_TOTAL,
        PUBLISH_DUPLICATES_TOTAL,
        PUBLISH_CLIENT_REBUILDS_TOTAL,
    ] {
        metrics::counter!(name).increment(0);
    }
    describe_counter!(
        PUBLISH_RETRIES_TOTAL,
        Unit::Count,
        "Publishes resent to Redis after a transient failure (MOVED, ASK, TRYAGAIN, connection lost, timeout), with the same idempotency key."
    );
    describe_counter!(
        PUBLISH_DUPLICATES_TOTAL,
        Unit::Count,
        "Publishes whose idempotency key was already applied on the channel: not published again, the first offset returned."
    );
    describe_counter!(
        PUBLISH_CLIENT_REBUILDS_TOTAL,
        Unit::Count,
        "Redis command clients replaced because a command went unanswered while Redis was reachable."
    );
    describe_counter!(
        PUBLISH_FAILED_TOTAL,
        Unit::Count,
        "Publishes that failed, by reason (gave_up: transient failures until the retry deadline; error: not transient)."
    );
    describe_counter!(
        API_REQUESTS_TOTAL,
        Unit::Count,
        "Server API requests, by endpoint and status."
    );
    describe_counter!(
        CLIENT_HTTP_REQUESTS_TOTAL,
        Unit::Count,
        "Client requests over plain HTTP (/sse streams opened or refused, /client/* commands), by endpoint and status."
    );
}
