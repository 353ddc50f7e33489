//! A real MQTT client (rumqttc, v3.1.1) driven step by step, so tests wait
//! on packets, not on time.

use std::net::SocketAddr;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

pub struct Device {
    pub client: AsyncClient,
    pub events: EventLoop,
}

impl Device {
    pub async fn connect(addr: SocketAddr, id: &str, clean: bool) -> Device {
        Device::connect_opts(Device::options(addr, id, clean)).await
    }

    /// Connects with a user name and a token as the password.
    pub async fn connect_as(addr: SocketAddr, id: &str, user: &str, token: &str) -> Device {
        let mut opts = Device::options(addr, id, true);
        opts.set_credentials(user, token);
        Device::connect_opts(opts).await
    }

    pub fn options(addr: SocketAddr, id: &str, clean: bool) -> MqttOptions {
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_clean_session(clean);
        opts.set_keep_alive(std::time::Duration::from_secs(30));
        opts
    }

    pub async fn connect_opts(opts: MqttOptions) -> Device {
        let (client, events) = AsyncClient::new(opts, 64);
        let mut device = Device { client, events };
        device.until(|p| matches!(p, Packet::ConnAck(_))).await;
        device
    }

    /// Polls until a packet matches; panics on connection errors or after WAIT.
    pub async fn until(&mut self, mut want: impl FnMut(&Packet) -> bool) -> Packet {
        let fut = async {
            loop {
                match self.events.poll().await {
                    Ok(Event::Incoming(p)) if want(&p) => return p,
                    Ok(_) => {}
                    Err(e) => panic!("mqtt connection error: {e}"),
                }
            }
        };
        tokio::time::timeout(super::WAIT, fut)
            .await
            .expect("expected MQTT packet did not arrive")
    }

    pub async fn subscribe(&mut self, topic: &str) {
        let granted = self.try_subscribe(topic).await;
        assert!(granted, "subscription to {topic} refused");
    }

    /// Subscribes; true if the SUBACK grants it.
    pub async fn try_subscribe(&mut self, topic: &str) -> bool {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        match self.until(|p| matches!(p, Packet::SubAck(_))).await {
            Packet::SubAck(ack) => matches!(
                ack.return_codes[..],
                [rumqttc::SubscribeReasonCode::Success(_)]
            ),
            _ => unreachable!(),
        }
    }

    /// The next PUBLISH's topic, payload and QoS.
    pub async fn next_publish(&mut self) -> (String, Bytes, QoS) {
        match self.until(|p| matches!(p, Packet::Publish(_))).await {
            Packet::Publish(p) => (p.topic, p.payload, p.qos),
            _ => unreachable!(),
        }
    }

    /// The next PUBLISH's payload as JSON.
    pub async fn next_json(&mut self) -> serde_json::Value {
        let (_, payload, _) = self.next_publish().await;
        serde_json::from_slice(&payload).expect("payload is JSON")
    }

    pub async fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .expect("queue publish");
        self.until(|p| matches!(p, Packet::PubAck(_))).await;
    }

    pub async fn disconnect(mut self) {
        self.client.disconnect().await.expect("queue disconnect");
        let _ = tokio::time::timeout(super::WAIT, async {
            while self.events.poll().await.is_ok() {}
        })
        .await;
    }
}
