//! The remote API (`--api-listen`): `/v1` for readers elsewhere in the cluster, each request
//! reviewed by the Kubernetes API server ([`super::auth`]) before any handler runs, so that a
//! refused caller learns nothing (an unknown instance and another tenant's are both 403).
//!
//! - No `Authorization: Bearer` token, or one the `TokenReview` rejects: 401 with
//!   `WWW-Authenticate: Bearer`.
//! - Authenticated without the permission: 403. A per-instance route asks `get pods/log` in
//!   the namespace of the instance's Pod ([`PodIndex`]), then `get nodes/proxy` on this node;
//!   node-wide routes only the latter.
//! - A review the API server could not answer: 503 (never allowed by default).
//!
//! Every decision is counted (`collector_api_auth_decisions_total{decision}`) and every refusal
//! logged (method, path, decision, the user when known; never the token).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use axum::{
    extract::{Request, State},
    http::{HeaderValue, header},
    middleware::Next,
    response::Response,
};
use tracing::warn;

use super::auth::{self, Access, Denied, Reviewer};
use crate::{
    model::{
        identity::{Identity, IdentityUpdate},
        metrics::CounterVec,
    },
    util::ttl_cache::TtlCache,
};

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
    pub(crate) pods: PodIndex,
    /// `collector_api_auth_decisions_total`, by `decision`.
    pub(crate) decisions: CounterVec,
}

/// The Pod (namespace, name) backing each instance, from the Kubernetes source's updates. A
/// deleted Pod's instance keeps its entry for `retention` (bounded), so that its tenant can
/// still read the lines and events the collector keeps after it is gone.
#[derive(Debug, Clone)]
pub(crate) struct PodIndex(Arc<PodIndexInner>);

#[derive(Debug)]
struct PodIndexInner {
    live: RwLock<HashMap<String, (String, String)>>,
    gone: Mutex<TtlCache<String, (String, String)>>,
}

fn pod_of(identity: &Identity) -> (String, String) {
    (identity.pod_namespace.clone(), identity.pod.clone())
}

impl PodIndex {
    /// An index keeping deleted Pods' instances `retention`, at most `max_gone` of them.
    pub(crate) fn new(retention: Duration, max_gone: usize) -> Self {
        Self(Arc::new(PodIndexInner {
            live: RwLock::new(HashMap::new()),
            gone: Mutex::new(TtlCache::new(retention, max_gone)),
        }))
    }

    pub(crate) fn apply(&self, update: &IdentityUpdate) {
        let mut live = self
            .0
            .live
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match update {
            IdentityUpdate::Created {
                instance_uuid,
                identity,
            }
            | IdentityUpdate::Changed {
                instance_uuid,
                identity,
            } => {
                live.insert(instance_uuid.clone(), pod_of(identity));
            }
            IdentityUpdate::Deleted {
                instance_uuid,
                identity,
            } => {
                live.remove(instance_uuid);
                lock(&self.0.gone).insert(instance_uuid.clone(), pod_of(identity), Instant::now());
            }
            IdentityUpdate::Synced => {}
        }
    }

    /// The Pod backing `uuid` (or that backed it, within the retention).
    pub(crate) fn pod_of(&self, uuid: &str) -> Option<(String, String)> {
        let live = self
            .0
            .live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pod) = live.get(uuid) {
            return Some(pod.clone());
        }
        drop(live);
        lock(&self.0.gone).get(&uuid.to_owned(), Instant::now())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The middleware of every `/v1` route of the remote API.
pub(crate) async fn review(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    // A path the classification does not know is asked the most of: this node's.
    let access = auth::access_for(path, |uuid| guard.pods.pod_of(uuid)).unwrap_or(Access::Node);
    let Err((denied, username)) = guard.reviewer.decide(request.headers(), &access).await else {
        guard.decisions.inc(&[decision(Ok(()))]);
        return next.run(request).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(ns: &str, pod: &str) -> Identity {
        Identity {
            project: None,
            instance_name: None,
            instance_namespace: None,
            workload: None,
            pod: pod.into(),
            pod_namespace: ns.into(),
            node: "n1".into(),
        }
    }

    #[test]
    fn the_index_follows_pods_and_keeps_the_deleted_for_a_while() {
        let index = PodIndex::new(Duration::from_millis(200), 1);
        let pod = |ns: &str, name: &str| Some((ns.to_owned(), name.to_owned()));
        index.apply(&IdentityUpdate::Created {
            instance_uuid: "u1".into(),
            identity: identity("ns-a", "p1"),
        });
        assert_eq!(index.pod_of("u1"), pod("ns-a", "p1"));
        assert_eq!(index.pod_of("u2"), None);
        index.apply(&IdentityUpdate::Changed {
            instance_uuid: "u1".into(),
            identity: identity("ns-a", "p2"),
        });
        assert_eq!(index.pod_of("u1"), pod("ns-a", "p2"));
        index.apply(&IdentityUpdate::Deleted {
            instance_uuid: "u1".into(),
            identity: identity("ns-a", "p2"),
        });
        assert_eq!(index.pod_of("u1"), pod("ns-a", "p2"), "kept after deletion");
        // Bounded: a second deletion pushes the first out.
        index.apply(&IdentityUpdate::Deleted {
            instance_uuid: "u3".into(),
            identity: identity("ns-c", "p3"),
        });
        assert_eq!(index.pod_of("u1"), None);
        assert_eq!(index.pod_of("u3"), pod("ns-c", "p3"));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(index.pod_of("u3"), None, "expired");
    }

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
