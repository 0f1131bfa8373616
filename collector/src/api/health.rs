//! `/metrics`, `/healthz` and `/readyz`.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};

use super::{
    ApiState,
    views::{ProbeView, ReadinessView},
};
use crate::sinks::prometheus::Format;

pub(super) async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    // The exposition reads /proc for every instance: not on the async workers, which also
    // read the kernel's rings.
    let exposition = state.exposition.clone();
    match tokio::task::spawn_blocking(move || exposition.render(format)).await {
        Ok(body) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// 200 `ok` while every pipeline runs, else 503 and the pipelines that stopped.
pub(super) async fn healthz(State(state): State<ApiState>) -> Response {
    let down = state.exposition.health.pipelines.down();
    if down.is_empty() {
        return (StatusCode::OK, "ok\n").into_response();
    }
    let names: Vec<&str> = down.iter().map(|p| p.as_str()).collect();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("pipelines down: {}\n", names.join(", ")),
    )
        .into_response()
}

pub(super) async fn readyz(State(state): State<ApiState>) -> Response {
    let probes: Vec<ProbeView> = state
        .readiness
        .probes
        .iter()
        .map(|p| ProbeView {
            probe: p.probe.to_owned(),
            attached: p.attached,
            error: p.error.clone(),
        })
        .collect();
    let ready = state.readiness.is_ready();
    let degraded = probes
        .iter()
        .filter(|p| !p.attached)
        .map(|p| p.probe.clone())
        .collect();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let view = ReadinessView {
        ready,
        degraded,
        probes,
        identities_synced: state.readiness.identities_state(),
    };
    (status, Json(view)).into_response()
}
