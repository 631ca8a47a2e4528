//! What carries a session's bytes: [`ws`] (WebSocket, both ways) and [`sse`]
//! (Server-Sent Events, server to client; the client's commands go over
//! [`crate::client_api`]). A transport turns its wire into client messages and the
//! session's outbox into its wire; sessions, subscriptions and limits are the same
//! whichever carries them.

pub(crate) mod sse;
pub(crate) mod ws;
