//! The device registry over HTTP, writing the same schema as the old service.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{id, HttpError, HttpState};
use crate::push::UserRecord;
use crate::registry::UserStore;
use crate::utc::rfc3339;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UserBody {
    token: Option<String>,
    ident: Option<String>,
    version: Option<String>,
}

#[derive(Serialize)]
pub(super) struct UserView {
    id: String,
    token: Option<String>,
    ident: Option<String>,
    version: Option<String>,
    focus: bool,
}

pub(super) async fn get(
    State(state): State<HttpState>,
    Path(uid): Path<String>,
) -> Result<Json<UserView>, HttpError> {
    let uid = id(&uid)?;
    let record = state.user(&uid).await?.ok_or(HttpError::NotFound)?;
    Ok(Json(UserView {
        id: uid.to_string(),
        token: record.app_token,
        ident: record.app_ident,
        version: record.app_version,
        focus: record.app_focus,
    }))
}

pub(super) async fn put(
    State(state): State<HttpState>,
    Path(uid): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, HttpError> {
    let uid = id(&uid)?;
    let body: UserBody = serde_json::from_slice(&body)
        .map_err(|e| HttpError::BadRequest(format!("bad user body: {e}")))?;
    if let Some(token) = &body.token {
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(HttpError::BadRequest("token must be hex".into()));
        }
    }
    let record = UserRecord {
        app_token: body.token,
        app_ident: body.ident,
        app_version: body.version,
        app_focus: false,
    };
    state
        .registry
        .put_user(&uid, &record)
        .await
        .map_err(|e| state.registry_failed(e))?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn delete(
    State(state): State<HttpState>,
    Path(uid): Path<String>,
) -> Result<StatusCode, HttpError> {
    match state
        .registry
        .delete_user(&id(&uid)?)
        .await
        .map_err(|e| state.registry_failed(e))?
    {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(HttpError::NotFound),
    }
}

pub(super) async fn add_member(
    State(state): State<HttpState>,
    Path((gid, uid)): Path<(String, String)>,
) -> Result<StatusCode, HttpError> {
    state
        .registry
        .add_group_apple_member(&id(&gid)?, &id(&uid)?)
        .await
        .map_err(|e| state.registry_failed(e))?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn remove_member(
    State(state): State<HttpState>,
    Path((gid, uid)): Path<(String, String)>,
) -> Result<StatusCode, HttpError> {
    state
        .registry
        .remove_group_apple_member(&id(&gid)?, &id(&uid)?)
        .await
        .map_err(|e| state.registry_failed(e))?;
    Ok(StatusCode::NO_CONTENT)
}

/// Whether a user's app is connected to the embedded broker now, and since
/// when; and whether it last said it is in the foreground.
pub(super) async fn presence(
    State(state): State<HttpState>,
    Path(uid): Path<String>,
) -> Result<Json<serde_json::Value>, HttpError> {
    let uid = id(&uid)?;
    let Some(broker) = state.dispatcher.broker.embedded() else {
        return Err(HttpError::Unavailable(
            "presence is known to the embedded broker only (mqtt.external_url is set)".into(),
        ));
    };
    let seen = broker.presence(uid.as_str());
    let focus = state.user(&uid).await?.is_some_and(|r| r.app_focus);
    let client_ids: Vec<&str> = seen.iter().map(|s| &*s.client_id).collect();
    Ok(Json(serde_json::json!({
        "user": uid.as_str(),
        "connected": !seen.is_empty(),
        "since": seen.first().map(|s| rfc3339(s.since as i64)),
        "client_ids": client_ids,
        "focus": focus,
    })))
}

/// The outcomes of the user's last pushes sent with `receipt: true`,
/// newest first (at most `receipts::RECENT`, while receipts keep them).
pub(super) async fn pushes(
    State(state): State<HttpState>,
    Path(uid): Path<String>,
) -> Result<Json<serde_json::Value>, HttpError> {
    let uid = id(&uid)?;
    let receipts = &state.dispatcher.receipts;
    if !receipts.enabled() {
        return Err(HttpError::Missing(
            "receipts are off (receipts.enabled = false)".into(),
        ));
    }
    let pushes = receipts.recent(&uid).await?;
    Ok(Json(
        serde_json::json!({"user": uid.as_str(), "pushes": pushes}),
    ))
}
