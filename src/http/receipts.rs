//! `GET /v1/pushes/{id}`: what became of a push sent with `receipt: true`.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::Value;

use super::{HttpError, HttpState};
use crate::push::PushId;

pub(super) async fn get(
    State(state): State<HttpState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, HttpError> {
    let receipts = &state.dispatcher.receipts;
    if !receipts.enabled() {
        return Err(HttpError::Missing(
            "receipts are off (receipts.enabled = false)".into(),
        ));
    }
    let push = PushId::given(&id)
        .ok_or_else(|| HttpError::BadRequest(format!("push id {id:?}: {}", PushId::RULE)))?;
    receipts.outcome(&push).await?.map(Json).ok_or_else(|| {
        HttpError::Missing(format!(
            "no receipt for push {push}: not sent with receipt: true, \
             or older than receipts.ttl_secs"
        ))
    })
}
