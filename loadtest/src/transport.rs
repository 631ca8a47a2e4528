//! A client on either transport: connected, subscribed, and receiving the same way, so
//! that scenarios name the transport once. (The transports know nothing of each other.)

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::client::{self, Seen, Shared, Target, Ws};
use crate::{sse, Transport};

/// A client connected and subscribed over one transport or the other.
pub enum Subscribed {
    Ws(Ws),
    Sse(sse::Stream),
}

/// Connects client `i` with `token` over `transport` and subscribes it to `channel`.
pub async fn open(
    target: &Target,
    transport: Transport,
    i: usize,
    token: &str,
    channel: &str,
) -> anyhow::Result<Subscribed> {
    Ok(match transport {
        Transport::Ws => {
            let mut ws = target.connect(i, token).await?;
            client::subscribe(&mut ws, channel).await?;
            Subscribed::Ws(ws)
        }
        Transport::Sse => Subscribed::Sse(sse::open(target, i, token, channel).await?),
    })
}

impl Subscribed {
    /// Receives until `stop`; see [`client::receive`].
    pub async fn receive(self, i: usize, shared: Arc<Shared>, stop: CancellationToken) -> Seen {
        match self {
            Subscribed::Ws(ws) => client::receive(ws, i, shared, stop).await,
            Subscribed::Sse(stream) => stream.receive(i, shared, stop).await,
        }
    }
}
