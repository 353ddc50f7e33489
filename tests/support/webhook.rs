//! A real webhook receiver (HTTP/1.1, or HTTPS with a test certificate)
//! that checks each request's signature as docs/receipts.md says and hands
//! the test what it got.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::service::service_fn;
use serde_json::Value;
use tokio::sync::mpsc;

use super::pki::Pki;

/// One request: whether its signature was right, and its events.
pub type Request = (bool, Vec<Value>);

/// How the receiver behaves.
#[derive(Default)]
pub struct Options<'a> {
    /// Serve HTTPS with this certificate.
    pub tls: Option<&'a Pki>,
    /// Answer 500 to this many first requests, 200 after.
    pub fail_first: usize,
    /// Take requests and never answer them.
    pub hang: bool,
}

pub struct Receiver {
    pub addr: SocketAddr,
    pub requests: mpsc::UnboundedReceiver<Request>,
}

impl Receiver {
    pub async fn start(secret: &'static str, options: Options<'_>) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = options.tls.map(acceptor);
        let (tx, requests) = mpsc::unbounded_channel();
        let (fail_first, hang) = (options.fail_first, options.hang);
        let served = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (tx, served, tls) = (tx.clone(), served.clone(), tls.clone());
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (tx, served) = (tx.clone(), served.clone());
                    async move {
                        // A body cut short (the sender killed) is no request.
                        if let Some(request) = read(secret, req).await {
                            let _ = tx.send(request);
                        }
                        if hang {
                            std::future::pending::<()>().await;
                        }
                        let status = match served.fetch_add(1, Ordering::SeqCst) < fail_first {
                            true => 500,
                            false => 200,
                        };
                        let answer = hyper::Response::builder().status(status);
                        let body = http_body_util::Full::new(bytes::Bytes::new());
                        Ok::<_, std::convert::Infallible>(answer.body(body).unwrap())
                    }
                });
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        None => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            http.serve_connection(io, service).await
                        }
                        // A client that refuses the certificate ends here.
                        Some(tls) => match tls.accept(stream).await {
                            Ok(s) => {
                                let io = hyper_util::rt::TokioIo::new(s);
                                http.serve_connection(io, service).await
                            }
                            Err(_) => Ok(()),
                        },
                    };
                });
            }
        });
        Receiver { addr, requests }
    }

    /// The next request; panics after WAIT.
    pub async fn next(&mut self) -> Request {
        tokio::time::timeout(super::WAIT, self.requests.recv())
            .await
            .expect("a webhook request in time")
            .expect("receiver running")
    }

    /// Events, every request's signature checked, until one matches `want`
    /// (returned last); panics after WAIT.
    pub async fn until(&mut self, want: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut got = Vec::new();
        loop {
            let (valid, events) = self.next().await;
            assert!(valid, "bad signature on {events:?}");
            for e in events {
                let done = want(&e);
                got.push(e);
                if done {
                    return got;
                }
            }
        }
    }

    /// The first event matching `want`; the ones before it are checked and dropped.
    pub async fn matching(&mut self, want: impl Fn(&Value) -> bool) -> Value {
        self.until(want).await.pop().expect("the match comes last")
    }
}

async fn read(secret: &str, req: hyper::Request<hyper::body::Incoming>) -> Option<Request> {
    let header = |n: &str| req.headers()[n].to_str().unwrap().to_owned();
    let (timestamp, signature) = (
        header("x-pushbridge-timestamp"),
        header("x-pushbridge-signature"),
    );
    let body = req.into_body().collect().await.ok()?.to_bytes();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let signed = [timestamp.as_bytes(), b".", &body].concat();
    let hex = signature.strip_prefix("sha256=").unwrap_or("");
    let tag: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let valid = ring::hmac::verify(&key, &signed, &tag).is_ok();
    let events: Value = serde_json::from_slice(&body).unwrap();
    Some((valid, events["events"].as_array().unwrap().clone()))
}

fn acceptor(pki: &Pki) -> tokio_rustls::TlsAcceptor {
    let certs = rustls_pemfile::certs(&mut &std::fs::read(&pki.cert).unwrap()[..])
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut &std::fs::read(&pki.key).unwrap()[..])
        .unwrap()
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
