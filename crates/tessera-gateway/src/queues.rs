//! Queues: put, get and count messages of a queue on the bus, bounded in messages and
//! bytes.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use tessera_ports::QueueBound;

use crate::api::{ApiError, Gateway};
use crate::authz::Caller;

impl Gateway {
    fn bound(&self) -> QueueBound {
        QueueBound::new(self.config.queue_capacity, self.config.queue_max_bytes)
    }
}

/// Records a queue's depth as last seen through this gateway: after a put and after a get
/// that took a message (not on reads, so asking about names that hold nothing makes no
/// series).
fn depth(name: &str, len: u64) {
    metrics::gauge!(tessera_ports::metrics::QUEUE_DEPTH, "queue" => name.to_owned()).set(len as f64);
}

/// Messages waiting in a queue, and its bound.
#[utoipa::path(get, path = "/api/v1/queues/{name}", params(("name" = String, Path, description = "The queue")),
    responses((status = 200, body = Value), (status = 400, body = Value), (status = 403, body = Value)))]
pub(crate) async fn queue_len(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    gw.authorize_queue(&caller, &name).await?;
    let len = gw.node.bus().len(&name).await?;
    Ok(Json(
        json!({"name": name, "len": len, "capacity": gw.config.queue_capacity, "max_bytes": gw.config.queue_max_bytes}),
    ))
}

/// Puts a JSON message on a queue; refused with 429 `queue_full` while the queue is at its
/// bound (messages or bytes).
#[utoipa::path(post, path = "/api/v1/queues/{name}", params(("name" = String, Path, description = "The queue")),
    request_body(content = Value, description = "The message: any JSON value"),
    responses((status = 201, body = Value), (status = 400, body = Value), (status = 403, body = Value), (status = 413, body = Value), (status = 429, body = Value)))]
pub(crate) async fn queue_put(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    gw.authorize_queue(&caller, &name).await?;
    serde_json::from_slice::<serde::de::IgnoredAny>(&body)
        .map_err(|e| ApiError::bad(format!("a queue message is a JSON value: {e}")))?;
    let bus = gw.node.bus();
    bus.put_bounded(&name, body, gw.bound()).await?;
    let len = bus.len(&name).await?;
    depth(&name, len);
    Ok((StatusCode::CREATED, Json(json!({"name": name, "len": len}))))
}

/// How long a get waits.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct GetQuery {
    /// Seconds to wait for a message (at most 30).
    #[serde(default)]
    wait: Option<f64>,
}

/// Takes the next message of a queue (acknowledged: delivered once through this route);
/// 204 when none came within `wait`.
#[utoipa::path(post, path = "/api/v1/queues/{name}/get", params(("name" = String, Path, description = "The queue"), GetQuery),
    responses((status = 200, body = Value), (status = 204), (status = 400, body = Value), (status = 403, body = Value)))]
pub(crate) async fn queue_get(
    State(gw): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<GetQuery>,
) -> Result<Response, ApiError> {
    gw.authorize_queue(&caller, &name).await?;
    let wait = match q.wait {
        None => Duration::ZERO,
        Some(w) if w.is_finite() && w >= 0.0 => Duration::from_secs_f64(w.min(30.0)),
        Some(w) => return Err(ApiError::bad(format!("wait {w}: must be a number of seconds"))),
    };
    let bus = gw.node.bus();
    match bus.get(&name, wait).await? {
        None => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(d) => {
            let payload = d.payload.clone();
            d.ack().await?;
            // The message is taken: a failure to count what is left must not lose it.
            if let Ok(len) = bus.len(&name).await {
                depth(&name, len);
            }
            Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], payload).into_response())
        }
    }
}
