//! Token checks against a real node: configured `aud`/`iss` are required of every kind
//! of token, `nbf` is honoured, and `refresh` takes away what the new token no longer
//! grants.

mod common;

use common::*;
use fanout_testkit::{Incoming, WsClient};
use serde_json::json;

async fn close_code_for(url: &str) -> (Option<u16>, String) {
    let mut c = WsClient::connect(url).await.unwrap();
    match c.next().await {
        Incoming::Closed { code, reason } => (code, reason),
        other => panic!("expected a close, got {other:?}"),
    }
}

#[tokio::test]
async fn configured_audience_and_issuer_are_required_of_every_token() {
    let node = start(
        None,
        &[
            "--jwt-audience",
            "fanout",
            "--jwt-issuer",
            "https://auth.test",
        ],
    )
    .await;
    let ws = node.ws_url();
    let full = json!({"sub":"5","exp":now()+600,"aud":"fanout","iss":"https://auth.test"});
    let without = |claim: &str| {
        let mut c = full.clone();
        c.as_object_mut().unwrap().remove(claim);
        c
    };
    // Connection tokens, in the query and as the first frame.
    for claim in ["aud", "iss"] {
        let (code, reason) =
            close_code_for(&format!("{ws}?token={}", token_with(without(claim)))).await;
        assert_eq!(code, Some(4001), "no {claim}");
        assert!(reason.contains(claim), "{reason}");
        let mut c = WsClient::connect(&ws).await.unwrap();
        c.send(json!({"type":"auth","token":token_with(without(claim))}))
            .await;
        assert_eq!(
            c.expect_close().await,
            Some(4001),
            "auth frame without {claim}"
        );
    }
    let mut c = connect(&node, &token_with(full.clone())).await;
    // Refresh tokens.
    for (id, claim) in [(1, "aud"), (2, "iss")] {
        c.send(json!({"type":"refresh","id":id,"token":token_with(without(claim))}))
            .await;
        let e = c.recv_type("error").await;
        assert_eq!(
            (e["id"].as_u64(), e["code"].as_str()),
            (Some(id), Some("unauthorized")),
            "{e}"
        );
    }
    // Subscription tokens.
    for (id, claim) in [(3, "aud"), (4, "iss")] {
        let mut sub = without(claim);
        sub["channel"] = "job_progress:9".into();
        c.send(
            json!({"type":"subscribe","id":id,"channel":"job_progress:9","token":token_with(sub)}),
        )
        .await;
        let e = c.recv_type("error").await;
        assert_eq!(
            (e["id"].as_u64(), e["code"].as_str()),
            (Some(id), Some("unauthorized")),
            "{e}"
        );
    }
    let mut sub = full.clone();
    sub["channel"] = "job_progress:9".into();
    c.send(json!({"type":"subscribe","id":5,"channel":"job_progress:9","token":token_with(sub)}))
        .await;
    assert_eq!(c.recv_type("subscribed").await["id"], 5);
    assert!(metric(&node, "fanout_auth_failures_total{reason=\"missing_claim\"").await >= 8.0);
    node.shutdown().await;
}

#[tokio::test]
async fn a_token_valid_only_later_is_refused_until_then() {
    let node = start(None, &[]).await;
    let ws = node.ws_url();
    let later = token_with(json!({"sub":"5","exp":now()+7200,"nbf":now()+3600}));
    let (code, reason) = close_code_for(&format!("{ws}?token={later}")).await;
    assert_eq!(code, Some(4001));
    assert!(reason.contains("not valid yet"), "{reason}");
    // In refresh too.
    let mut c = connect(&node, &token("5", &[])).await;
    c.send(json!({"type":"refresh","id":1,"token":later})).await;
    assert_eq!(c.recv_type("error").await["code"], "unauthorized");
    // Within the 5 s leeway (clock skew) it is accepted.
    let skewed = token_with(json!({"sub":"5","exp":now()+600,"nbf":now()+2}));
    connect(&node, &skewed).await;
    assert_eq!(
        metric(&node, "fanout_auth_failures_total{reason=\"not_yet_valid\"").await,
        2.0
    );
    node.shutdown().await;
}

#[tokio::test]
async fn refresh_ends_the_subscriptions_the_new_token_no_longer_grants() {
    for backend in Backend::all() {
        let node = start(backend.url().as_deref(), &[]).await;
        // (One metrics registry per test process: both backends count into it.)
        let revoked = metric(&node, "fanout_subscriptions_revoked_total").await;
        let old = token_with(
            json!({"sub":"5","exp":now()+600,"channels":["chat:a","chat:b","job_progress:5"]}),
        );
        let mut c = connect(&node, &old).await;
        for (id, ch) in [
            (1, "chat:a"),
            (2, "chat:b"),
            (3, "user:5"),
            (8, "job_progress:5"),
        ] {
            assert_eq!(c.subscribe(id, ch).await["type"], "subscribed", "{ch}");
        }
        // A job that finishes before the refresh: its subscription ended then, and the
        // refresh says nothing more of it.
        let (status, body) =
            api_publish(&node, "job_progress:5", json!({"status": "succeeded"})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(c.recv_type("message").await["channel"], "job_progress:5");
        let done = c.recv_type("unsubscribed").await;
        assert_eq!(done["reason"], "completed", "{done}");
        // Granted by a subscription token: kept until that token expires.
        let sub = token_with(json!({"sub":"5","exp":now()+600,"channel":"job_progress:9"}));
        c.send(json!({"type":"subscribe","id":4,"channel":"job_progress:9","token":sub}))
            .await;
        assert_eq!(c.recv_type("subscribed").await["id"], 4);

        let narrower = token_with(json!({"sub":"5","exp":now()+600,"channels":["chat:b"]}));
        c.send(json!({"type":"refresh","id":5,"token":narrower}))
            .await;
        assert_eq!(
            c.recv().await,
            json!({"type":"unsubscribed","channel":"chat:a","reason":"forbidden"}),
            "{}",
            backend.name()
        );
        assert_eq!(c.recv().await, json!({"type":"reply","id":5}));
        // Nothing more of chat:a; the rest flows.
        for ch in ["chat:a", "chat:b", "user:5", "job_progress:9"] {
            let (status, body) = api_publish(&node, ch, json!({"on": ch})).await;
            assert_eq!(status, 200, "{body}");
        }
        for ch in ["chat:b", "user:5", "job_progress:9"] {
            let m = c.recv_type("message").await;
            assert_eq!(m["channel"], ch, "{}: {m}", backend.name());
        }
        c.send(json!({"type":"ping","id":6})).await;
        assert_eq!(c.recv().await, json!({"type":"pong","id":6}));
        // It can be taken again only with a token that grants it.
        assert_eq!(c.subscribe(7, "chat:a").await["code"], "forbidden");
        assert_eq!(
            metric(&node, "fanout_subscriptions_revoked_total").await - revoked,
            1.0
        );
        node.shutdown().await;
    }
}
