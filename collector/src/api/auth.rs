//! Who may read what through the remote API: a bearer token, authenticated by a `TokenReview`
//! and authorised by a `SubjectAccessReview`, the way the kubelet guards its own API.
//!
//! - Per-instance routes (`/v1/instances/{uuid}`, `/logs`, `/events`): `get` on `pods/log`
//!   for the instance's Pod, in the Pod's namespace (what `kubectl logs` needs); else `get` on
//!   `nodes/proxy` for this node (an operator who may proxy to the node may read all of it).
//!   An instance whose Pod is not known is node-wide only.
//! - Node-wide routes (`/v1/instances`, `/v1/events`): `get` on `nodes/proxy` for this node.
//! - No token, or one the API server does not authenticate: 401. Authenticated without the
//!   permission: 403. The API server unreachable: 503 (never allowed by default). No header
//!   other than `Authorization` is read: no tenant header can widen access.
//!
//! Decisions are cached for `kubernetes.auth_cache_seconds`, at most
//! `kubernetes.auth_cache_entries` of each kind, keyed by the token's SHA-256 (the token is
//! never kept, nor logged).

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, StatusCode, header};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use percent_encoding::percent_decode_str;
use tracing::warn;

use crate::{config::KubernetesConfig, model::metrics::CounterVec, util::ttl_cache::TtlCache};

/// The `review` and `outcome` label values of `collector_api_reviews_total`, pre-set at 0.
pub(crate) const REVIEWS: [[&str; 2]; 4] = [
    ["token", "ok"],
    ["token", "error"],
    ["access", "ok"],
    ["access", "error"],
];

/// Bound of one review request.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// What a route reads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Access {
    /// One instance's data; its Pod (namespace, name) when known.
    Instance { pod: Option<(String, String)> },
    /// The whole node's.
    Node,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No bearer token, or one the API server does not authenticate.
    Unauthenticated,
    /// Authenticated, without the permission.
    Forbidden,
    /// The API server could not be asked.
    Unavailable,
}

impl Denied {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub(crate) fn message(self) -> &'static str {
        match self {
            Self::Unauthenticated => "a valid bearer token is required",
            Self::Forbidden => "not allowed",
            Self::Unavailable => "the access review could not be made",
        }
    }
}

/// An authenticated caller, as the TokenReview named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    pub(crate) username: String,
    pub(crate) uid: Option<String>,
    pub(crate) groups: Vec<String>,
    pub(crate) extra: BTreeMap<String, Vec<String>>,
}

/// The attributes one SubjectAccessReview asks about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Permission {
    namespace: Option<String>,
    resource: &'static str,
    subresource: &'static str,
    name: String,
}

type TokenDigest = [u8; 32];

/// The reviewer of remote callers: one per collector, shared by every request.
pub(crate) struct Reviewer {
    client: Client,
    node: String,
    /// Token digest -> the caller, or `None` for a token not authenticated.
    authenticated: Mutex<TtlCache<TokenDigest, Option<Caller>>>,
    /// (token digest, permission) -> allowed.
    authorised: Mutex<TtlCache<(TokenDigest, Permission), bool>>,
    /// Reviews sent to the API server (cache misses), by `review` and `outcome`.
    reviews: CounterVec,
}

/// The bearer token of a request: one `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer")
        && !token.is_empty()
        && !token.contains(char::is_whitespace))
    .then_some(token)
}

/// What a path of `/v1` reads; `None` for a path the remote API does not serve.
/// `pod_of(uuid)` names the Pod backing an instance.
pub(crate) fn access_for(
    path: &str,
    pod_of: impl Fn(&str) -> Option<(String, String)>,
) -> Option<Access> {
    let segments: Vec<&str> = path.strip_prefix("/v1/")?.split('/').collect();
    match segments.as_slice() {
        ["instances" | "events"] => Some(Access::Node),
        ["instances", uuid] | ["instances", uuid, "logs" | "events"] => {
            let uuid = percent_decode_str(uuid).decode_utf8().ok()?;
            Some(Access::Instance { pod: pod_of(&uuid) })
        }
        _ => None,
    }
}

fn digest(token: &str) -> TokenDigest {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

impl Access {
    /// The permissions that each grant it, in the order asked.
    fn permissions(&self, node: &str) -> Vec<Permission> {
        let node_proxy = Permission {
            namespace: None,
            resource: "nodes",
            subresource: "proxy",
            name: node.to_owned(),
        };
        match self {
            Self::Instance {
                pod: Some((namespace, pod)),
            } => vec![
                Permission {
                    namespace: Some(namespace.clone()),
                    resource: "pods",
                    subresource: "log",
                    name: pod.clone(),
                },
                node_proxy,
            ],
            Self::Instance { pod: None } | Self::Node => vec![node_proxy],
        }
    }
}

impl Reviewer {
    pub(crate) fn new(client: Client, node: String, config: &KubernetesConfig) -> Self {
        let ttl = Duration::from_secs(config.auth_cache_seconds);
        Self {
            client,
            node,
            authenticated: Mutex::new(TtlCache::new(ttl, config.auth_cache_entries)),
            authorised: Mutex::new(TtlCache::new(ttl, config.auth_cache_entries)),
            reviews: CounterVec::default(),
        }
    }

    /// Counts the reviews sent into `reviews` (`collector_api_reviews_total`).
    pub(crate) fn counting(mut self, reviews: CounterVec) -> Self {
        self.reviews = reviews;
        self
    }

    /// The caller, if the request's token is valid and grants `access`.
    #[cfg(test)]
    pub(crate) async fn review(
        &self,
        headers: &HeaderMap,
        access: &Access,
    ) -> Result<Caller, Denied> {
        self.decide(headers, access)
            .await
            .map_err(|(denied, _)| denied)
    }

    /// [`Reviewer::review`], a refusal naming the caller's user whenever the token was
    /// authenticated (for its log line).
    pub(crate) async fn decide(
        &self,
        headers: &HeaderMap,
        access: &Access,
    ) -> Result<Caller, (Denied, Option<String>)> {
        let token = bearer(headers).ok_or((Denied::Unauthenticated, None))?;
        let key = digest(token);
        let caller = self
            .authenticate(token, key)
            .await
            .map_err(|denied| (denied, None))?;
        for permission in access.permissions(&self.node) {
            match self.authorise(&caller, key, permission).await {
                Ok(true) => return Ok(caller),
                Ok(false) => {}
                Err(denied) => return Err((denied, Some(caller.username))),
            }
        }
        Err((Denied::Forbidden, Some(caller.username)))
    }

    async fn authenticate(&self, token: &str, key: TokenDigest) -> Result<Caller, Denied> {
        let cached = lock(&self.authenticated).get(&key, Instant::now());
        let caller = if let Some(caller) = cached {
            caller
        } else {
            let caller = self.token_review(token).await?;
            lock(&self.authenticated).insert(key, caller.clone(), Instant::now());
            caller
        };
        caller.ok_or(Denied::Unauthenticated)
    }

    async fn authorise(
        &self,
        caller: &Caller,
        key: TokenDigest,
        permission: Permission,
    ) -> Result<bool, Denied> {
        let cache_key = (key, permission);
        if let Some(allowed) = lock(&self.authorised).get(&cache_key, Instant::now()) {
            return Ok(allowed);
        }
        let allowed = self.access_review(caller, &cache_key.1).await?;
        lock(&self.authorised).insert(cache_key, allowed, Instant::now());
        Ok(allowed)
    }

    async fn token_review(&self, token: &str) -> Result<Option<Caller>, Denied> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer =
            tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review)).await;
        let status = match answer {
            Ok(Ok(review)) => {
                self.reviews.inc(&["token", "ok"]);
                review.status.unwrap_or_default()
            }
            Ok(Err(error)) => {
                self.reviews.inc(&["token", "error"]);
                warn!(%error, "token review failed");
                return Err(Denied::Unavailable);
            }
            Err(_) => {
                self.reviews.inc(&["token", "error"]);
                warn!(
                    timeout_seconds = REVIEW_TIMEOUT.as_secs(),
                    "token review timed out"
                );
                return Err(Denied::Unavailable);
            }
        };
        let user = status.user.filter(|_| status.authenticated == Some(true));
        Ok(user.and_then(|user| {
            Some(Caller {
                username: user.username.filter(|u| !u.is_empty())?,
                uid: user.uid,
                groups: user.groups.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
            })
        }))
    }

    async fn access_review(
        &self,
        caller: &Caller,
        permission: &Permission,
    ) -> Result<bool, Denied> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(caller.username.clone()),
                uid: caller.uid.clone(),
                groups: Some(caller.groups.clone()),
                extra: (!caller.extra.is_empty()).then(|| caller.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some("get".to_owned()),
                    group: Some(String::new()),
                    version: Some("v1".to_owned()),
                    resource: Some(permission.resource.to_owned()),
                    subresource: Some(permission.subresource.to_owned()),
                    namespace: permission.namespace.clone(),
                    name: Some(permission.name.clone()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        match tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
            .await
        {
            Ok(Ok(review)) => {
                self.reviews.inc(&["access", "ok"]);
                Ok(review.status.is_some_and(|s| s.allowed))
            }
            Ok(Err(error)) => {
                self.reviews.inc(&["access", "error"]);
                warn!(%error, "access review failed");
                Err(Denied::Unavailable)
            }
            Err(_) => {
                self.reviews.inc(&["access", "error"]);
                warn!(
                    timeout_seconds = REVIEW_TIMEOUT.as_secs(),
                    "access review timed out"
                );
                Err(Denied::Unavailable)
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn refusals_answer_401_403_503() {
        assert_eq!(Denied::Unauthenticated.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Denied::Forbidden.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            Denied::Unavailable.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(Denied::Unauthenticated.message().contains("bearer token"));
    }

    #[test]
    fn one_bearer_token_exactly() {
        let headers = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            }
            h
        };
        assert_eq!(bearer(&headers(&["Bearer abc"])), Some("abc"));
        assert_eq!(bearer(&headers(&["bearer abc"])), Some("abc"));
        assert_eq!(bearer(&headers(&[])), None);
        assert_eq!(bearer(&headers(&["Basic abc"])), None);
        assert_eq!(bearer(&headers(&["Bearer "])), None);
        assert_eq!(bearer(&headers(&["Bearer a b"])), None);
        assert_eq!(bearer(&headers(&["Bearer a", "Bearer b"])), None);
    }

    #[test]
    fn routes_and_what_they_read() {
        let pod_of = |uuid: &str| (uuid == "u 1").then(|| ("ns-a".to_owned(), "p1".to_owned()));
        let known = Some(Access::Instance {
            pod: Some(("ns-a".into(), "p1".into())),
        });
        assert_eq!(access_for("/v1/instances", pod_of), Some(Access::Node));
        assert_eq!(access_for("/v1/events", pod_of), Some(Access::Node));
        assert_eq!(access_for("/v1/instances/u%201", pod_of), known);
        assert_eq!(access_for("/v1/instances/u%201/logs", pod_of), known);
        assert_eq!(access_for("/v1/instances/u%201/events", pod_of), known);
        assert_eq!(
            access_for("/v1/instances/other/logs", pod_of),
            Some(Access::Instance { pod: None })
        );
        assert_eq!(access_for("/metrics", pod_of), None);
        assert_eq!(access_for("/v1/instances/u/other", pod_of), None);
        assert_eq!(access_for("/v1", pod_of), None);
    }

    #[test]
    fn instance_access_asks_for_pod_logs_then_the_node() {
        let access = Access::Instance {
            pod: Some(("ns-a".into(), "p1".into())),
        };
        let asked: Vec<(Option<String>, &str, &str, String)> = access
            .permissions("n1")
            .into_iter()
            .map(|p| (p.namespace, p.resource, p.subresource, p.name))
            .collect();
        assert_eq!(
            asked,
            [
                (Some("ns-a".into()), "pods", "log", "p1".into()),
                (None, "nodes", "proxy", "n1".into())
            ]
        );
        assert_eq!(Access::Node.permissions("n1").len(), 1);
        assert_eq!(Access::Instance { pod: None }.permissions("n1").len(), 1);
    }

    mod against_the_api_server {
        use collector_tests::kube_api::{FakeKube, Grant, PolicyRule, Subject};
        use kube::config::{KubeConfigOptions, Kubeconfig};

        use super::*;

        async fn client(fake: &FakeKube) -> Client {
            let kubeconfig = Kubeconfig::read_from(fake.kubeconfig()).unwrap();
            let config =
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .unwrap();
            Client::try_from(config).unwrap()
        }

        fn token(value: &str) -> HeaderMap {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {value}")).unwrap(),
            );
            headers
        }

        fn pod(ns: &str, name: &str) -> Access {
            Access::Instance {
                pod: Some((ns.into(), name.into())),
            }
        }

        /// A tenant with `get pods/log` in ns-a, an operator group with `get nodes/proxy` on n1.
        fn fake() -> FakeKube {
            let fake = FakeKube::start();
            fake.add_token("tenant-a", "alice", &["tenants"]);
            fake.add_token("operator", "oscar", &["operators"]);
            fake.grant(Grant {
                subject: Subject::User("alice".into()),
                namespace: Some("ns-a".into()),
                rules: vec![PolicyRule::core("get", "pods/log")],
            });
            fake.grant(Grant {
                subject: Subject::Group("operators".into()),
                namespace: None,
                rules: vec![PolicyRule {
                    resource_names: vec!["n1".into()],
                    ..PolicyRule::core("get", "nodes/proxy")
                }],
            });
            fake
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn tenants_read_their_namespace_operators_the_node() {
            let fake = fake();
            let reviewer = Reviewer::new(
                client(&fake).await,
                "n1".into(),
                &KubernetesConfig::default(),
            );
            let (a, b) = (pod("ns-a", "p1"), pod("ns-b", "p2"));

            assert_eq!(
                reviewer.review(&HeaderMap::new(), &a).await,
                Err(Denied::Unauthenticated)
            );
            assert_eq!(
                fake.counts().requests("create tokenreviews"),
                0,
                "no token, no review"
            );
            assert_eq!(
                reviewer.review(&token("forged"), &a).await,
                Err(Denied::Unauthenticated)
            );

            let alice = reviewer.review(&token("tenant-a"), &a).await.unwrap();
            assert_eq!(alice.username, "alice");
            assert!(alice.groups.contains(&"tenants".to_owned()));
            assert_eq!(
                reviewer.review(&token("tenant-a"), &b).await,
                Err(Denied::Forbidden)
            );
            assert_eq!(
                reviewer.review(&token("tenant-a"), &Access::Node).await,
                Err(Denied::Forbidden)
            );
            assert_eq!(
                reviewer
                    .review(&token("tenant-a"), &Access::Instance { pod: None })
                    .await,
                Err(Denied::Forbidden),
                "an instance without a known Pod is node-wide only"
            );
            for access in [&a, &b, &Access::Node, &Access::Instance { pod: None }] {
                let oscar = reviewer.review(&token("operator"), access).await.unwrap();
                assert_eq!(oscar.username, "oscar");
            }
            // On another node the operator's grant (resourceNames: n1) does not reach.
            let elsewhere = Reviewer::new(
                client(&fake).await,
                "n2".into(),
                &KubernetesConfig::default(),
            );
            assert_eq!(
                elsewhere.review(&token("operator"), &Access::Node).await,
                Err(Denied::Forbidden)
            );

            // Cached: the same questions again ask the API server nothing.
            let before = fake.counts();
            assert!(reviewer.review(&token("tenant-a"), &a).await.is_ok());
            assert_eq!(
                reviewer.review(&token("tenant-a"), &b).await,
                Err(Denied::Forbidden)
            );
            assert_eq!(
                reviewer.review(&token("forged"), &a).await,
                Err(Denied::Unauthenticated)
            );
            let after = fake.counts();
            assert_eq!(after.requests, before.requests);

            // The API server down: what is cached still holds, anything new is refused (503).
            fake.cut();
            assert!(reviewer.review(&token("tenant-a"), &a).await.is_ok());
            fake.add_token("tenant-b", "bob", &[]);
            assert_eq!(
                reviewer.review(&token("tenant-b"), &b).await,
                Err(Denied::Unavailable)
            );
            fake.restore();
            assert_eq!(
                reviewer.review(&token("tenant-b"), &b).await,
                Err(Denied::Forbidden)
            );
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn decisions_expire_and_the_caches_are_bounded() {
            let fake = fake();
            let config = KubernetesConfig {
                auth_cache_seconds: 1,
                auth_cache_entries: 2,
                ..KubernetesConfig::default()
            };
            let reviewer = Reviewer::new(client(&fake).await, "n1".into(), &config);
            let a = pod("ns-a", "p1");
            assert!(reviewer.review(&token("tenant-a"), &a).await.is_ok());
            assert!(reviewer.review(&token("tenant-a"), &a).await.is_ok());
            assert_eq!(fake.counts().requests("create tokenreviews"), 1);
            tokio::time::sleep(Duration::from_millis(1100)).await;
            assert!(reviewer.review(&token("tenant-a"), &a).await.is_ok());
            assert_eq!(
                fake.counts().requests("create tokenreviews"),
                2,
                "expired, asked again"
            );

            for t in ["x1", "x2", "x3"] {
                let _ = reviewer.review(&token(t), &a).await;
            }
            assert_eq!(lock(&reviewer.authenticated).len(), 2);
            assert!(lock(&reviewer.authorised).len() <= 2);
        }
    }
}
