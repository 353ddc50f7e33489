//! Shared test harness: a real redis-server, the whole pushbridge in-process
//! on 127.0.0.1:0, raw proxy frames and real MQTT clients.
#![allow(dead_code)]

pub mod http;
pub mod mqtt;
pub mod proxy;
pub mod redis;
pub mod server;

use std::time::Duration;

/// Bounds a wait that only a failure would exceed; never a timing claim.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `cond` (cheap local state: counters, registry reads) until it holds;
/// panics after WAIT. For state with no event to wait on.
pub async fn wait_until<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
