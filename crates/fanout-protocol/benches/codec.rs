//! The protocol's share of the hot path: decoding what Redis delivers (the envelope),
//! encoding the frame sent to every subscriber (once per message and codec), and
//! decoding client frames. `cargo bench -p fanout-protocol`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fanout_protocol::{Codec, Envelope};

/// A job-progress payload as the publisher writes it (~150 bytes of data).
fn payload() -> String {
    r#"{"fanout":1,"offset":18,"epoch":"k3j2h1g0","event":"progress","ts":1732290000123,"data":{"status":"running","pct":40,"message":"enriched 400 of 1000 rows","rows":400,"total":1000}}"#.to_string()
}

fn envelope_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("envelope_decode");
    let p = payload();
    g.throughput(Throughput::Bytes(p.len() as u64));
    g.bench_function("with_offset", |b| {
        b.iter(|| Envelope::decode(black_box(p.as_bytes()), 0))
    });
    // A plain PUBLISH by anyone: the whole payload is the data.
    let raw = r#"{"pct":40,"message":"enriched 400 of 1000 rows"}"#;
    g.bench_function("raw_publish", |b| {
        b.iter(|| Envelope::decode(black_box(raw.as_bytes()), 0))
    });
    g.finish();
}

fn frame_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_encode");
    let env = Envelope::decode(payload().as_bytes(), 0);
    for codec in [Codec::Json, Codec::MsgPack] {
        g.bench_function(format!("message_{codec:?}").to_lowercase(), |b| {
            b.iter(|| black_box(&env).encode_message(black_box("job_progress:7"), codec))
        });
    }
    g.finish();
}

fn client_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("client_frame_decode");
    let sub = br#"{"type":"subscribe","id":1,"channel":"job_progress:7","since":{"offset":17,"epoch":"k3j2h1g0"}}"#;
    g.bench_function("subscribe_json", |b| {
        b.iter(|| Codec::Json.decode_client(black_box(sub)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, envelope_decode, frame_encode, client_decode);
criterion_main!(benches);
