//! The whole pushbridge in-process, on free loopback ports.

use pushbridge::settings::Settings;
use pushbridge::Server;
use tokio_util::sync::CancellationToken;

/// Settings for a test server: every listener on 127.0.0.1:0, the given
/// Redis (or the in-memory registry), no config.json unless set later.
pub fn settings(redis_url: Option<&str>) -> Settings {
    let mut s = Settings::default();
    s.proxy.listen = "127.0.0.1:0".parse().unwrap();
    s.mqtt.listen = "127.0.0.1:0".parse().unwrap();
    s.http.listen = "127.0.0.1:0".parse().unwrap();
    s.registry.redis_url = redis_url.map(String::from);
    s.apns.config = "/nonexistent/config.json".into();
    s
}

pub async fn start(settings: Settings) -> Server {
    pushbridge::start(settings, CancellationToken::new())
        .await
        .expect("server starts")
}
