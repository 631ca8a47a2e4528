//! `redis-sentinel://`: an edge and a publisher find the primary through a real Sentinel,
//! and a `SENTINEL FAILOVER` mid-stream loses no acknowledged message.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use fanout_publisher::{HistoryPolicy, Publisher};
use fanout_testkit::RedisSentinel;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_mid_stream_loses_nothing_acknowledged() {
    let sentinel = Arc::new(
        tokio::task::spawn_blocking(RedisSentinel::start)
            .await
            .unwrap()
            .expect("redis sentinel"),
    );
    let url = sentinel.url();
    let cfg = config_file("[namespaces.room]\nhistory_size = 10000\n");
    let node = start(Some(&url), &["--config", cfg.to_str().unwrap()]).await;
    let mut c = connect(&node, &token("4", &["room:*"])).await;
    assert_eq!(c.subscribe(1, "room:s").await["type"], "subscribed");

    let publisher = Publisher::connect(&url).await.unwrap().with_history(
        "room",
        HistoryPolicy {
            size: 10_000,
            ttl: Duration::from_secs(600),
            finished_ttl: None,
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let pub_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                n += 1;
                match publisher.publish("room:s", "", &json!({ "n": n })).await {
                    Ok(_) => acked.push(n),
                    Err(e) => eprintln!("#{n} not acknowledged: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n += 1;
            for attempt in 0.. {
                match publisher.publish("room:s", "", &json!({ "n": n })).await {
                    Ok(_) => break,
                    Err(e) if attempt < 100 => {
                        eprintln!("last not acknowledged: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("no publish for 10 s after the failover: {e}"),
                }
            }
            acked.push(n);
            (acked, n)
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = sentinel.primary_port();
    let after = {
        let sentinel = sentinel.clone();
        tokio::task::spawn_blocking(move || sentinel.failover())
            .await
            .unwrap()
            .expect("failover")
    };
    assert_ne!(before, Some(after));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, last) = pub_task.await.unwrap();

    let got = numbers(&read_until_n(&mut c, last).await);
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicates"
    );
    let missing: Vec<u64> = acked
        .iter()
        .filter(|n| got.binary_search(n).is_err())
        .copied()
        .collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert!(acked.len() > 100, "the stream ran");
    // The edge follows the new primary: ready, and its own publish path works.
    eventually("the edge ready after the failover", || async {
        readyz(&node).await == 200
    })
    .await;
    let (status, body) = api_publish(&node, "room:s", json!({"n": last + 1})).await;
    assert_eq!(status, 200, "{body}");
    node.shutdown().await;
}
