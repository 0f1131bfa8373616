//! The HTTP server.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::views::{InstanceView, ProbeView, Readiness, VcpuThread};
use crate::{
    clock,
    discovery::{matchers::Matcher, proc_scan},
    registry::{Instance, SnapshotReceiver},
    sinks::events::{EventSink, Sequenced},
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
    pub events: EventSink,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/instances", get(list_instances))
        .route("/v1/instances/{uuid}", get(get_instance))
        .route("/v1/instances/{uuid}/events", get(instance_events))
        .route("/v1/events", get(events))
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
        origin: instance.origin.as_str().to_owned(),
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

const NDJSON: &str = "application/x-ndjson";

fn ndjson_line(event: &Sequenced) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({ "error": what })),
    )
        .into_response()
}

/// `GET /v1/instances/{uuid}/events`: the instance's retained events, oldest first.
async fn instance_events(State(state): State<AppState>, Path(uuid): Path<String>) -> Response {
    let Some(events) = state.events.of_instance(&uuid) else {
        return not_found("no events for this instance");
    };
    let body: Vec<u8> = events.iter().flat_map(|e| ndjson_line(e)).collect();
    ([(header::CONTENT_TYPE, NDJSON)], body).into_response()
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// Keep the response open and stream new events as they happen.
    #[serde(default)]
    follow: bool,
    /// Only this instance's events.
    instance: Option<String>,
}

/// `GET /v1/events[?follow=true][&instance=UUID]`: retained events, oldest first, then (with
/// `follow`) every new one. A follower too slow for the live feed gets a `{"lagged": N}` line
/// saying how many it missed.
async fn events(State(state): State<AppState>, Query(query): Query<EventsQuery>) -> Response {
    let (backlog, receiver) = state.events.follow(query.instance.as_deref());
    if !query.follow {
        let body: Vec<u8> = backlog.iter().flat_map(|e| ndjson_line(e)).collect();
        return ([(header::CONTENT_TYPE, NDJSON)], body).into_response();
    }
    let last_seq = backlog.last().map_or(0, |e| e.seq);
    let head = stream::iter(
        backlog
            .into_iter()
            .map(|e| Ok::<_, std::convert::Infallible>(ndjson_line(&e))),
    );
    let tail = stream::unfold(
        (receiver, last_seq, query.instance),
        |(mut receiver, last_seq, instance)| async move {
            loop {
                match receiver.recv().await {
                    Ok(event) if event.seq <= last_seq => {}
                    Ok(event)
                        if instance
                            .as_ref()
                            .is_some_and(|i| *i != event.event.instance_uuid) => {}
                    Ok(event) => {
                        let line = ndjson_line(&event);
                        return Some((Ok(line), (receiver, event.seq, instance)));
                    }
                    Err(RecvError::Lagged(missed)) => {
                        let line = Bytes::from(format!("{{\"lagged\":{missed}}}\n"));
                        return Some((Ok(line), (receiver, last_seq, instance)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    );
    (
        [(header::CONTENT_TYPE, NDJSON)],
        Body::from_stream(head.chain(tail)),
    )
        .into_response()
}
