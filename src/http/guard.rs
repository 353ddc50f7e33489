//! What every request passes before a handler runs: the browser guard
//! (CSRF, DNS rebinding, JSON bodies only), the bearer token (compared in
//! constant time), and the body read whole within its deadline.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ring::hmac;
use serde_json::json;

use super::{HttpError, HttpState};

/// Largest request body (axum's default for its extractors, which still apply).
const BODY_LIMIT: usize = 2 << 20;

/// Reads the whole body before the handler runs, within `body_timeout`, so
/// a client trickling a body cannot hold a connection (and its permit).
pub(super) async fn read_body(
    State(state): State<HttpState>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(state.body_timeout, axum::body::to_bytes(body, BODY_LIMIT));
    let bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        // Over the limit (a broken connection gets no answer anyway).
        Ok(Err(e)) => {
            let error = json!({ "error": format!("request body over {BODY_LIMIT} bytes: {e}") });
            let answer = (
                StatusCode::PAYLOAD_TOO_LARGE,
                [(header::CONNECTION, "close")],
                Json(error),
            );
            return answer.into_response();
        }
        Err(_) => {
            let error = json!({ "error": "request body not received in time" });
            let answer = (
                StatusCode::REQUEST_TIMEOUT,
                [(header::CONNECTION, "close")],
                Json(error),
            );
            return answer.into_response();
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// `http.token`, kept as an HMAC tag under a key made at start, so that a
/// guess is compared in constant time whatever its length.
#[derive(Clone)]
pub struct ApiToken {
    key: hmac::Key,
    tag: Arc<[u8]>,
}

impl ApiToken {
    pub fn new(token: &str) -> ApiToken {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .expect("system randomness");
        let tag = hmac::sign(&key, token.as_bytes()).as_ref().into();
        ApiToken { key, tag }
    }

    fn matches(&self, given: &str) -> bool {
        hmac::verify(&self.key, given.as_bytes(), &self.tag).is_ok()
    }
}

pub(super) async fn require_token(
    State(state): State<HttpState>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        if !given.is_some_and(|g| token.matches(g)) {
            return HttpError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// What a web page on another site could make a browser send: refused, so
/// that an API without a token is not open to every site its user visits.
/// A `Host` must be an IP address (a page whose origin is an IP address was
/// served from that address, so it cannot be a rebinding), `localhost`, or
/// in `http.allowed_hosts`; a state-changing request whose `Origin` is not
/// this server is refused; a body must be JSON (a cross-site form can only
/// send `text/plain`, form or multipart bodies without a preflight).
pub(super) async fn browser_guard(
    State(state): State<HttpState>,
    req: Request,
    next: Next,
) -> Response {
    match check_browser(&state.allowed_hosts, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn check_browser(allowed: &[String], req: &Request) -> Result<(), HttpError> {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{fffd}"))
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if let Some(host) = host {
        if !host_allowed(allowed, host) {
            return Err(HttpError::MisdirectedHost(format!(
                "Host {host:?} is not served here: use an IP address or localhost, \
                 or list the name in http.allowed_hosts"
            )));
        }
    }
    let safe = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if let (false, Some(origin)) = (safe, headers.get(header::ORIGIN)) {
        let origin = origin.to_str().unwrap_or("null");
        let authority = origin.split_once("://").map(|(_, a)| a);
        let same = match (authority, host) {
            (Some(a), Some(h)) if a.eq_ignore_ascii_case(h) => true,
            (Some(a), _) => {
                let name = split_port(a).0;
                allowed.iter().any(|n| n.eq_ignore_ascii_case(name))
            }
            (None, _) => false,
        };
        if !same {
            return Err(HttpError::Forbidden(format!(
                "cross-origin request refused: Origin {origin:?} is not this server"
            )));
        }
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|l| l.as_bytes() != b"0");
    if has_body {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(HttpError::UnsupportedMediaType(
                "request bodies must be Content-Type: application/json".into(),
            ));
        }
    }
    Ok(())
}

/// `host[:port]` or `[v6][:port]` → (host, port).
fn split_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, port)) => (ip, port.strip_prefix(':')),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    }
}

fn host_allowed(allowed: &[String], host: &str) -> bool {
    let name = split_port(host).0;
    let name = name.strip_suffix('.').unwrap_or(name);
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|n| n.eq_ignore_ascii_case(name))
}
