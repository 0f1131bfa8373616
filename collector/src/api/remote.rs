//! The remote API (`--api-listen`): `/v1` for readers elsewhere in the cluster, each request
//! reviewed by the Kubernetes API server ([`super::auth`]) before any handler runs, so that a
//! refused caller learns nothing (an unknown instance and another tenant's are both 403).
//!
//! - No `Authorization: Bearer` token, or one the `TokenReview` rejects: 401 with
//!   `WWW-Authenticate: Bearer`.
//! - Authenticated without the permission: 403. A per-instance route asks `get pods/log` in
//!   the namespace of the instance's Pod (from the registry's snapshot, a departed instance's
//!   tombstone included), then `get nodes/proxy` on this node; node-wide routes only the
//!   latter.
//! - A review the API server could not answer: 503 (never allowed by default).
//! - An open stream is reviewed again as the decisions expire, and ends once refused.
//!
//! Every decision is counted (`collector_api_auth_decisions_total{decision}`) and every refusal
//! logged (method, path, decision, the user when known; never the token).

use std::{sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, header},
    middleware::Next,
    response::Response,
};
use futures_util::StreamExt;
use tracing::warn;

use super::auth::{self, Access, Denied, Reviewer};
use crate::model::{instance::SnapshotReceiver, metrics::CounterVec};

/// The `decision` label values of `collector_api_auth_decisions_total`, pre-set at 0.
pub(crate) const DECISIONS: [&str; 4] = ["allowed", "unauthenticated", "forbidden", "unavailable"];

fn decision(result: Result<(), Denied>) -> &'static str {
    match result {
        Ok(()) => "allowed",
        Err(Denied::Unauthenticated) => "unauthenticated",
        Err(Denied::Forbidden) => "forbidden",
        Err(Denied::Unavailable) => "unavailable",
    }
}

/// What the remote API's review of each request needs.
#[derive(Clone)]
pub(crate) struct Guard {
    pub(crate) reviewer: Arc<Reviewer>,
    /// Whose each instance is: the namespace of its Pod is where its logs' access is reviewed.
    pub(crate) snapshot: SnapshotReceiver,
    /// `collector_api_auth_decisions_total`, by `decision`.
    pub(crate) decisions: CounterVec,
    /// How often an open follow stream's access is reviewed again: the reviews' cache
    /// lifetime, so that each review is a fresh one.
    pub(crate) recheck: Duration,
}

impl Guard {
    /// The Pod (namespace, name) backing `uuid`, or that backed it (its tombstone).
    fn pod_of(&self, uuid: &str) -> Option<(String, String)> {
        self.snapshot
            .borrow()
            .identity_of(uuid)
            .map(|identity| (identity.pod_namespace.clone(), identity.pod.clone()))
    }
}

/// Reviews in a row the API server could not answer before an open follow stream ends: an
/// outage of a few seconds does not cut every reader, a longer one is not an open door.
const UNAVAILABLE_REVIEWS: u32 = 3;

/// The middleware of every `/v1` route of the remote API.
pub(crate) async fn review(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    // A path the classification does not know is asked the most of: this node's.
    let access = auth::access_for(path, |uuid| guard.pod_of(uuid)).unwrap_or(Access::Node);
    let Err((denied, username)) = guard.reviewer.decide(request.headers(), &access).await else {
        guard.decisions.inc(&[decision(Ok(()))]);
        let headers = request.headers().clone();
        let response = next.run(request).await;
        return reviewed_while_open(response, guard, headers, access);
    };
    guard.decisions.inc(&[decision(Err(denied))]);
    let peer = request
        .extensions()
        .get::<super::server::Peer>()
        .and_then(|p| p.0)
        .map(|addr| addr.to_string());
    warn!(
        decision = decision(Err(denied)),
        method = %request.method(),
        path,
        peer,
        username,
        access = match access {
            Access::Node => "node",
            Access::Instance { pod: Some(_) } => "instance",
            Access::Instance { pod: None } => "instance_without_pod",
        },
        "remote API request refused"
    );
    let mut response = super::error(denied.status(), denied.message());
    if denied == Denied::Unauthenticated {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// A response (a follow stream, a long history) stays open only while its reader keeps the
/// permission it was opened with: the review is made again every [`Guard::recheck`], and the
/// body ends at the first refusal (or after [`UNAVAILABLE_REVIEWS`] reviews in a row the API
/// server could not answer). Every response, not only `follow=true` ones: no spelling of the
/// query escapes it.
fn reviewed_while_open(
    response: Response,
    guard: Guard,
    headers: HeaderMap,
    access: Access,
) -> Response {
    let (parts, body) = response.into_parts();
    let revoked = async move {
        let mut unavailable = 0;
        loop {
            tokio::time::sleep(guard.recheck).await;
            let denied = match guard.reviewer.decide(&headers, &access).await {
                Ok(_) => {
                    unavailable = 0;
                    continue;
                }
                Err((Denied::Unavailable, _)) if unavailable + 1 < UNAVAILABLE_REVIEWS => {
                    unavailable += 1;
                    continue;
                }
                Err(refusal) => refusal,
            };
            guard.decisions.inc(&[decision(Err(denied.0))]);
            warn!(
                decision = decision(Err(denied.0)),
                username = denied.1,
                "remote API follow stream ended: its access was refused on review"
            );
            return;
        }
    };
    let body = Body::from_stream(body.into_data_stream().take_until(revoked));
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_decision_label() {
        let labels = [
            decision(Ok(())),
            decision(Err(Denied::Unauthenticated)),
            decision(Err(Denied::Forbidden)),
            decision(Err(Denied::Unavailable)),
        ];
        assert_eq!(labels, DECISIONS);
    }
}
