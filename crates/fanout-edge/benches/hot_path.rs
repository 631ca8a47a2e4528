//! The edge's hot path: a Redis message fanned out by the hub to N local subscribers
//! (one encoding per codec, shared bytes, one push per subscriber), and the JWT check
//! every connection pays. `cargo bench -p fanout-edge --features internals`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fanout_edge::auth::Auth;
use fanout_edge::internals::{
    Attach, Attached, Control, HistoryRead, Hub, Outbox, OutboxReader, QueueLimits, Subscriber,
};
use fanout_protocol::{Codec, Envelope};
use jsonwebtoken::{encode, EncodingKey, Header};

const CHANNEL: &str = "job_progress:bench";
/// Messages delivered between two drains of the subscribers' queues.
const BATCH: u64 = 256;

fn envelope(offset: u64) -> Arc<Envelope> {
    let payload = format!(
        r#"{{"fanout":1,"offset":{offset},"epoch":"e1","event":"progress","ts":1,"data":{{"status":"running","pct":40,"rows":{offset}}}}}"#
    );
    Arc::new(Envelope::decode(payload.as_bytes(), 0))
}

/// A hub with `n` live subscribers on one channel (JSON), and their queues.
fn hub_with(n: usize) -> (Hub, Vec<OutboxReader>) {
    let hub = Hub::default();
    let limits = QueueLimits {
        messages: 2 * BATCH as usize,
        bytes: 64 << 20,
        replay_messages: 16,
        replay_bytes: 1 << 20,
    };
    let mut inboxes = Vec::with_capacity(n);
    for id in 0..n as u64 {
        let control = Arc::new(Control::new());
        let (outbox, inbox) = Outbox::new(limits, control);
        hub.attach(
            Arc::from(CHANNEL),
            Subscriber::new(id, Codec::Json, outbox, false),
        );
        let joined = hub.complete_attach(
            CHANNEL,
            id,
            Attach {
                id: None,
                since: None,
                send_entries: false,
                history: HistoryRead {
                    epoch: Some("e1".into()),
                    top: 0,
                    entries: vec![],
                },
                attempt: 0,
            },
        );
        assert_eq!(joined, Attached::Live { recovered: None });
        inboxes.push(inbox);
    }
    for inbox in &mut inboxes {
        while inbox.try_next().is_some() {}
    }
    (hub, inboxes)
}

fn fan_out(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub_fan_out");
    for n in [1usize, 100, 1000, 10_000] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            let (hub, mut inboxes) = hub_with(n);
            let mut offset = 0u64;
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let batch = left.min(BATCH);
                    let envs: Vec<_> = (1..=batch).map(|i| envelope(offset + i)).collect();
                    let start = Instant::now();
                    for env in envs {
                        let d = hub.deliver(CHANNEL, env);
                        assert_eq!(d.queued, n, "every subscriber got it");
                        black_box(d);
                    }
                    spent += start.elapsed();
                    offset += batch;
                    left -= batch;
                    // The writers' side, outside the measurement.
                    for inbox in &mut inboxes {
                        while inbox.try_next().is_some() {}
                    }
                }
                spent
            });
        });
    }
    g.finish();
}

fn jwt_verify(c: &mut Criterion) {
    let secret = "bench-secret-0123456789abcdef";
    let auth = Auth::from_config(Some(secret), None, None, None, None).unwrap();
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let token = encode(
        &Header::default(),
        &serde_json::json!({"sub": "42", "exp": exp, "channels": ["job_progress:*"]}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    c.bench_function("jwt_verify/hs256", |b| {
        b.iter(|| auth.verify_connection(black_box(&token)).unwrap())
    });
    // The same token with its signature's last character changed.
    let last = if token.ends_with('A') { "B" } else { "A" };
    let bad = format!("{}{last}", &token[..token.len() - 1]);
    c.bench_function("jwt_verify/hs256_bad_signature", |b| {
        b.iter(|| auth.verify_connection(black_box(&bad)).unwrap_err())
    });
}

criterion_group!(benches, fan_out, jwt_verify);
criterion_main!(benches);
