//! The HTTP server.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::registry::Registry;

use super::views::{InstanceView, ProbeView, Readiness, VcpuThread};
use crate::{
    clock,
    discovery::{matchers::Matcher, proc_scan},
    registry::{Instance, SnapshotReceiver},
    telemetry::SharedProbes,
};

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Registry>,
    pub snapshot: SnapshotReceiver,
    pub probes: SharedProbes,
    /// Set once the programs are attached and the start-up scan is done.
    pub started: Arc<AtomicBool>,
    pub matchers: Arc<Vec<Matcher>>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/instances", get(list_instances))
        .route("/v1/instances/{uuid}", get(get_instance))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    let mut body = String::new();
    if prometheus_client::encoding::text::encode(&mut body, &state.metrics).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let probes: Vec<ProbeView> = state
        .probes
        .read()
        .expect("probe lock")
        .iter()
        .map(|p| ProbeView {
            probe: p.probe.to_owned(),
            attached: p.attached,
            error: p.error.clone(),
        })
        .collect();
    let ready = state.started.load(Ordering::Acquire) && probes.iter().all(|p| p.attached);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { ready, probes })).into_response()
}

fn view(instance: &Instance, matchers: &[Matcher]) -> InstanceView {
    let matcher = matchers.iter().find(|m| m.name == instance.matcher);
    let vcpu_threads = proc_scan::threads(instance.pid)
        .into_iter()
        .filter_map(|(tid, name)| {
            let index = matcher?.vcpu_index(&name)?;
            Some(VcpuThread { tid, index, name })
        })
        .collect();
    InstanceView {
        instance_uuid: instance.instance_uuid.clone(),
        hypervisor: instance.hypervisor.clone(),
        pid: instance.pid,
        start_time: clock::rfc3339(instance.start_time),
        origin: serde_json::to_value(instance.origin)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        executable: instance.executable.clone(),
        vcpu_threads,
        instance_dir: instance.instance_dir.clone(),
    }
}

async fn list_instances(State(state): State<AppState>) -> Json<Vec<InstanceView>> {
    let snapshot = state.snapshot.borrow().clone();
    Json(
        snapshot
            .by_pid
            .values()
            .map(|i| view(i, &state.matchers))
            .collect(),
    )
}

async fn get_instance(State(state): State<AppState>, Path(uuid): Path<String>) -> Response {
    let snapshot = state.snapshot.borrow().clone();
    match snapshot.by_uuid(&uuid).next() {
        Some(instance) => Json(view(instance, &state.matchers)).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no such instance"})),
        )
            .into_response(),
    }
}
