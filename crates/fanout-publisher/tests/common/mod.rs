//! What the publisher's end-to-end tests share: a real edge node on real Redis, and
//! connection tokens it accepts.
#![allow(dead_code)]

use clap::Parser;
use fanout_edge::{Args, Node, Settings};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

pub const SECRET: &str = "publisher-tests-secret-0123456789abcdef";
pub const ADMIN: &str = "publisher-tests-admin-0123456789abcdef";

/// An edge node on `redis` (any URL form), with [`SECRET`] and [`ADMIN`].
pub async fn edge(redis: &str, id: &str) -> Node {
    let args = [
        "fanout-edge",
        "--listen",
        "127.0.0.1:0",
        "--redis-url",
        redis,
        "--jwt-secret",
        SECRET,
        "--admin-token",
        ADMIN,
        "--node-id",
        id,
    ];
    Node::start(Settings::from_args(Args::try_parse_from(args).unwrap()).unwrap())
        .await
        .unwrap()
}

/// A connection token for `user` with a `channels` claim, valid for an hour.
pub fn token(user: &str, channels: &[&str]) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    encode(
        &Header::default(),
        &json!({"sub": user, "exp": exp, "channels": channels}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}
