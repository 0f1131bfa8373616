//! The HTTP API: one router over one state.
//!
//! Routes:
//! - `GET /metrics`: Prometheus text 0.0.4, or OpenMetrics to a scraper that ranks it first.
//! - `GET /healthz`: 200 while every pipeline runs; 503, naming the ones that stopped, once one
//!   has (the kubelet then restarts the collector).
//! - `GET /readyz`: 200 once the programs are loaded, the start-up scan is done and the core
//!   probes (`sched_process_exec`, `sched_process_exit`) are attached, else 503; the body
//!   lists every probe, and those not attached as `degraded`, either way.
//! - `GET /v1/instances`: JSON array of the instances on this host.
//! - `GET /v1/instances/{uuid}`: one instance, 404 if unknown.
//! - `GET /v1/instances/{uuid}/events`: the instance's lifecycle events (NDJSON, oldest first),
//!   kept after it exits; 404 if none.
//! - `GET /v1/events[?follow=true][&instance=UUID]`: all retained lifecycle events, then (with
//!   `follow`) new ones as they happen (NDJSON stream).
//! - `GET /v1/instances/{uuid}/logs?tail=N&since=TS&follow=true&stream=S`: console lines,
//!   NDJSON, streaming with `follow` ([`logs`]).
//!
//! Follow streams end when the collector shuts down, so that shutdown never waits for a reader.
//!
//! Exposure ([`Exposure`]): `--listen` and `--api-socket` serve every route; `--metrics-listen`
//! only the first three (`/v1` is 404 there); `--api-listen` ([`remote`]) `/healthz`, `/readyz`
//! and `/v1`, each `/v1` route behind a bearer token's review (`/metrics` is 404 there). Every route runs under a concurrency limit
//! (`http.max_concurrent_requests`, waiting for a turn counts against the timeout), and every
//! route but the two that stream (`/logs`, `/v1/events`) under a timeout
//! (`http.request_timeout_ms`, then 503). [`server`] adds the connection limits.

pub(crate) mod auth;
mod events;
mod health;
mod instances;
mod logs;
pub(crate) mod remote;
pub(crate) mod server;
pub(crate) mod tls;
pub(crate) mod views;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use tokio_util::sync::CancellationToken;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::{
    matching::Matchers,
    model::{
        instance::SnapshotReceiver,
        probe::{CORE_PROBES, ProbeState},
    },
    sinks::{console_logs::history::ConsoleHistory, events::EventStore, prometheus::Exposition},
};

/// Whether the collector is ready, as `/readyz` tells it.
#[derive(Debug, Clone)]
pub(crate) struct Readiness {
    pub(crate) probes: Arc<Vec<ProbeState>>,
    /// Set once the start-up scan is done.
    pub(crate) scanned: Arc<AtomicBool>,
    /// With the Kubernetes source on: set once its first full list of this node's Pods is in,
    /// so that a collector is not ready while it would report instances without identity.
    pub(crate) identities_synced: Option<Arc<AtomicBool>>,
}

impl Readiness {
    pub(crate) fn new(probes: Vec<ProbeState>) -> Self {
        Self {
            probes: Arc::new(probes),
            scanned: Arc::new(AtomicBool::new(false)),
            identities_synced: None,
        }
    }

    /// Readiness also waits for the Kubernetes source's first full list.
    pub(crate) fn wait_for_identities(&mut self) {
        self.identities_synced = Some(Arc::new(AtomicBool::new(false)));
    }

    /// The Kubernetes source's first full list is in (a no-op with the source off).
    pub(crate) fn identities_synced(&self) {
        if let Some(synced) = &self.identities_synced {
            synced.store(true, Ordering::Release);
        }
    }

    /// `None` with the Kubernetes source off, else whether its first full list is in.
    pub(crate) fn identities_state(&self) -> Option<bool> {
        self.identities_synced
            .as_ref()
            .map(|synced| synced.load(Ordering::Acquire))
    }

    /// The start-up scan is done.
    pub(crate) fn scanned(&self) {
        self.scanned.store(true, Ordering::Release);
    }

    /// Ready: scanned, the core probes attached (others may be off: their features are) and,
    /// with the Kubernetes source on, its first list in.
    pub(crate) fn is_ready(&self) -> bool {
        let core_attached = CORE_PROBES
            .iter()
            .all(|core| self.probes.iter().any(|p| p.probe == *core && p.attached));
        self.scanned.load(Ordering::Acquire)
            && core_attached
            && self.identities_state().unwrap_or(true)
    }
}

/// What every route reads.
#[derive(Debug, Clone)]
pub(crate) struct ApiState {
    pub(crate) exposition: Exposition,
    pub(crate) snapshot: SnapshotReceiver,
    pub(crate) readiness: Readiness,
    pub(crate) matchers: Matchers,
    pub(crate) events: EventStore,
    pub(crate) logs: ConsoleHistory,
    /// Cancelled at shutdown: every follow stream ends.
    pub(crate) shutdown: CancellationToken,
}

/// Which routes a server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exposure {
    /// Every route, `/v1` included.
    All,
    /// `/metrics`, `/healthz` and `/readyz` only.
    Metrics,
    /// `/healthz`, `/readyz` and `/v1`, every `/v1` route behind [`remote::Guard`].
    Remote,
}

impl Exposure {
    fn serves_v1(self) -> bool {
        matches!(self, Self::All | Self::Remote)
    }
}

/// Limits of each request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestLimits {
    pub(crate) max_concurrent: usize,
    pub(crate) timeout: Duration,
}

/// The router of one server. `guard` (required for [`Exposure::Remote`], ignored otherwise)
/// reviews each `/v1` request inside its turn and timeout, so that reviews are bounded as
/// handlers are.
pub(crate) fn router(
    state: ApiState,
    exposure: Exposure,
    limits: RequestLimits,
    guard: Option<remote::Guard>,
) -> Router {
    let turns = GlobalConcurrencyLimitLayer::new(limits.max_concurrent);
    let timeout = TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, limits.timeout);
    let guard = match exposure {
        Exposure::Remote => Some(guard.expect("the remote API has a guard")),
        Exposure::All | Exposure::Metrics => None,
    };
    let mut v1 = Router::new();
    let mut streaming = Router::new();
    if exposure.serves_v1() {
        v1 = v1
            .route("/v1/instances", get(instances::list))
            .route("/v1/instances/{uuid}", get(instances::one))
            .route("/v1/instances/{uuid}/events", get(events::of_instance));
        streaming = streaming
            .route("/v1/instances/{uuid}/logs", get(logs::logs))
            .route("/v1/events", get(events::all));
        if let Some(guard) = guard {
            let review = axum::middleware::from_fn_with_state(guard, remote::review);
            v1 = v1.route_layer(review.clone());
            streaming = streaming.route_layer(review);
        }
    }
    let mut app = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz));
    if exposure != Exposure::Remote {
        app = app.route("/metrics", get(health::metrics));
    }
    // The timeout covers the wait for a turn too; streaming routes get a turn for the
    // handler, no timeout on the stream.
    app = app
        .merge(v1)
        .route_layer(turns.clone())
        .route_layer(timeout);
    if exposure.serves_v1() {
        // (A route layer on a router without routes is a panic in axum.)
        app = app.merge(streaming.route_layer(turns));
    }
    app.fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
}

/// `{"error": message}` with `status`.
fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

const NDJSON: &str = "application/x-ndjson";

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(probe: &'static str, attached: bool) -> ProbeState {
        ProbeState {
            probe,
            attached,
            error: (!attached).then(|| "not on this kernel".to_owned()),
        }
    }

    #[test]
    fn readiness_waits_for_the_scan_and_the_core_probes_only() {
        let degraded = Readiness::new(vec![
            probe("sched_process_exec", true),
            probe("sched_process_exit", true),
            probe("mark_victim", false),
        ]);
        assert!(!degraded.is_ready(), "not before the scan");
        degraded.scanned();
        assert!(
            degraded.is_ready(),
            "an optional probe does not hold readiness"
        );
        let broken = Readiness::new(vec![
            probe("sched_process_exec", true),
            probe("sched_process_exit", false),
        ]);
        broken.scanned();
        assert!(!broken.is_ready());
    }

    #[test]
    fn readiness_waits_for_the_first_kubernetes_list_when_the_source_is_on() {
        let mut ready = Readiness::new(vec![
            probe("sched_process_exec", true),
            probe("sched_process_exit", true),
        ]);
        ready.wait_for_identities();
        ready.scanned();
        assert!(!ready.is_ready(), "not before the first list");
        assert_eq!(ready.identities_state(), Some(false));
        ready.identities_synced();
        assert!(ready.is_ready());
        assert_eq!(ready.identities_state(), Some(true));
    }
}
