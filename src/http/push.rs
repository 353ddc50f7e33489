//! `POST /v1/push`: the proxy's pushes as JSON, answered per notification
//! with what each became (routed now, not merely queued).

use axum::body::Bytes;
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::Duration;

use super::{apns_options, id, HttpError, HttpState};
use crate::dispatch::Delivered;
use crate::intake::{self, Intake, StreamWriter};
use crate::push::{Id, Push, PushId, Target};

/// How long a request waits for an unreachable registry before it is
/// answered 503: an HTTP client cannot wait as long as the proxy's queue.
const REGISTRY_WAIT: Duration = Duration::from_secs(10);

/// The body: `{"notifications": [...]}`, or one notification object on its
/// own (what a backend developer tries first); both are answered alike.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    notifications: Vec<Notification>,
}

impl Request {
    fn parse(body: &[u8]) -> Result<(Request, bool), HttpError> {
        let bad = |e: serde_json::Error| HttpError::BadRequest(format!("bad request body: {e}"));
        let value: Value = serde_json::from_slice(body).map_err(bad)?;
        let single = !value
            .as_object()
            .is_some_and(|o| o.contains_key("notifications"));
        Ok(match single {
            true => (
                Request {
                    notifications: vec![serde_json::from_value(value).map_err(bad)?],
                },
                true,
            ),
            false => (serde_json::from_value(value).map_err(bad)?, false),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Notification {
    user: Option<Value>,
    users: Option<Vec<Value>>,
    group: Option<Value>,
    data: Map<String, Value>,
    apns: Option<Map<String, Value>>,
    /// The backend's own push id; unset, one is generated.
    id: Option<String>,
    receipt: Option<Value>,
    ttl: Option<Value>,
}

fn json_id(v: &Value) -> Result<Id, HttpError> {
    match v {
        Value::Number(n) if n.is_u64() || n.is_i64() => Ok(Id::from(n.to_string().as_str())),
        Value::String(s) => id(s),
        other => Err(HttpError::BadRequest(format!(
            "bad id {other}: must be an integer or a string"
        ))),
    }
}

impl Notification {
    /// `at` names the notification in errors: `notifications[1]`, or
    /// `notification` for a single-object body.
    fn into_push(self, at: &str) -> Result<Push, HttpError> {
        let at_err = |e: HttpError| HttpError::BadRequest(format!("{at}: {e}"));
        let target = match (self.user, self.users, self.group) {
            (Some(u), None, None) => Target::User(json_id(&u).map_err(at_err)?),
            (None, Some(us), None) if !us.is_empty() => Target::Users(
                us.iter()
                    .map(json_id)
                    .collect::<Result<_, _>>()
                    .map_err(at_err)?,
            ),
            (None, None, Some(g)) => Target::Group(json_id(&g).map_err(at_err)?),
            _ => {
                return Err(at_err(HttpError::BadRequest(
                    "needs exactly one of user, users (non-empty) or group".into(),
                )))
            }
        };
        let apns = match &self.apns {
            Some(o) => Some(Arc::new(
                apns_options::parse(o).map_err(|e| HttpError::BadRequest(format!("{at}.{e}")))?,
            )),
            None => None,
        };
        let mut push = Push::new(target, Arc::new(self.data));
        push.apns = apns;
        push.receipt = match &self.receipt {
            None => false,
            Some(r) => r.as_bool().ok_or_else(|| {
                HttpError::BadRequest(format!("{at}.receipt {r}: must be true or false"))
            })?,
        };
        if let Some(id) = &self.id {
            push.id = PushId::given(id).ok_or_else(|| {
                HttpError::BadRequest(format!("{at}.id {id:?}: {}", PushId::RULE))
            })?;
        }
        if let Some(ttl) = &self.ttl {
            push.ttl = Some(ttl.as_u64().and_then(Push::ttl_from).ok_or_else(|| {
                HttpError::BadRequest(format!(
                    "{at}.ttl {ttl}: seconds from 1 to {}",
                    Push::MAX_TTL
                ))
            })?);
        }
        Ok(push)
    }
}

pub(super) async fn push(
    State(state): State<HttpState>,
    body: Bytes,
) -> Result<Json<Value>, HttpError> {
    let (request, single) = Request::parse(&body)?;
    let name = |i: usize| match single {
        true => "notification".to_string(),
        false => format!("notifications[{i}]"),
    };
    let n = request.notifications.len();
    if n == 0 || n > state.max_notifications {
        return Err(HttpError::BadRequest(format!(
            "notifications: {n} given, between 1 and {} accepted",
            state.max_notifications
        )));
    }
    let pushes = request
        .notifications
        .into_iter()
        .enumerate()
        .map(|(i, n)| n.into_push(&name(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let durable = matches!(state.intake, Intake::Durable(_));
    if let (true, Some(i)) = (durable, pushes.iter().position(|p| p.apns.is_some())) {
        return Err(HttpError::BadRequest(format!(
            "{}.apns: overrides are not kept in the durable intake stream \
             (intake.durable = true); send without them",
            name(i)
        )));
    }
    let delivered = match &state.intake {
        Intake::Memory(_) => {
            state
                .dispatcher
                .route_now(&pushes, Vec::new(), REGISTRY_WAIT)
                .await?
        }
        Intake::Durable(stream) => append(&state, stream, &pushes).await?,
    };
    state.stats.http_pushes.add(pushes.len() as u64);
    let results: Vec<Value> = pushes
        .iter()
        .zip(&delivered)
        .map(|(p, d)| describe(p, d))
        .collect();
    Ok(Json(json!({ "results": results })))
}

/// Durable intake: what the pushes will become (routed now), answered only
/// once they are in the stream; a consumer delivers them, so the sessions
/// reached are not known (`null`).
async fn append(
    state: &HttpState,
    stream: &StreamWriter,
    pushes: &[Push],
) -> Result<Vec<Delivered>, HttpError> {
    let planned = state.dispatcher.plan(pushes, REGISTRY_WAIT).await?;
    let bodies: Vec<_> = pushes.iter().map(intake::encode).collect();
    if let Err(e) = stream.append(&bodies, REGISTRY_WAIT, &state.shutdown).await {
        state.stats.intake_unavailable.add(pushes.len() as u64);
        return Err(e.into());
    }
    Ok(planned)
}

fn describe(push: &Push, d: &Delivered) -> Value {
    let mqtt: Vec<Value> = d
        .routing
        .mqtt_topics
        .iter()
        .enumerate()
        .map(|(i, topic)| json!({"topic": topic, "sessions": d.sessions.get(i)}))
        .collect();
    let apns: Vec<Value> = d
        .routing
        .apns
        .iter()
        .map(|a| {
            json!({
                "user": a.user.as_str(),
                "app": a.app_ident,
                "environment": a.env.name(),
            })
        })
        .collect();
    let unknown: Vec<&str> = d.unknown_users.iter().map(Id::as_str).collect();
    json!({"id": push.id.to_string(), "mqtt": mqtt, "apns": apns, "unknown_users": unknown})
}
