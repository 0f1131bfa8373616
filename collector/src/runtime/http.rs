//! The HTTP side of `collector run`: its own runtime, the listeners it binds, the rule that
//! keeps unauthenticated `/v1` off non-loopback addresses unless the operator says otherwise,
//! and the remote API's reviews (`--api-listen`).

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    api::{
        self, ApiState, Exposure, RequestLimits,
        auth::{self, Reviewer},
        remote::{self, Guard},
        server::{self, ConnectionLimits, Listener},
        tls,
    },
    config::Config,
    model::metrics::CounterVec,
    sources::kubernetes::KubernetesSource,
};

/// Threads of the HTTP runtime (its `/proc` reads go to its own blocking pool).
const HTTP_WORKERS: usize = 1;

/// The runtime the HTTP servers run on, apart from the one that reads the kernel's rings.
pub(super) struct HttpRuntime(Option<tokio::runtime::Runtime>);

impl HttpRuntime {
    pub(super) fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(HTTP_WORKERS)
            .thread_name("collector-http")
            .enable_all()
            .build()
            .context("starting the HTTP runtime")?;
        Ok(Self(Some(runtime)))
    }

    fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.as_ref().expect("running").spawn(future)
    }
}

impl Drop for HttpRuntime {
    fn drop(&mut self) {
        // Dropped from inside the main runtime: a blocking drop is not allowed there, and its
        // servers have ended by now (or overran the shutdown budget, logged).
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A listener, which routes it serves, and its name in logs and metrics.
pub(super) struct Bound {
    server: &'static str,
    pub(super) listener: Listener,
    pub(super) exposure: Exposure,
}

/// What the remote API needs, configured before anything else starts: a client of the
/// Kubernetes API (the reviews), the node, and the TLS acceptor. Whose each instance is comes
/// from the registry's snapshot (a departed instance's tombstone included, so its tenant can
/// read what the collector keeps of it).
pub(super) struct RemoteApi {
    client: kube::Client,
    node: String,
    tls: Option<TlsAcceptor>,
}

/// The remote API's configuration when `api_listen` is set: it needs the Kubernetes source
/// (the reviews are made with its client, its Pods say whose an instance is) and this node's
/// name (`nodes/proxy` names it), else a clear error.
pub(super) fn remote_api(
    config: &Config,
    source: Option<&KubernetesSource>,
) -> anyhow::Result<Option<RemoteApi>> {
    let Some(addr) = config.api_listen else {
        return Ok(None);
    };
    if !config.kubernetes.enabled {
        anyhow::bail!(
            "api_listen {addr}: the remote API reviews every token with the Kubernetes API \
             server; it needs the Kubernetes source (kubernetes.enabled = true)"
        );
    }
    let Some(source) = source else {
        anyhow::bail!(
            "api_listen {addr}: the remote API reviews every token with the Kubernetes API \
             server, and there is no client configuration (not in a cluster, KUBECONFIG unset)"
        );
    };
    let Some(node) = source.node.clone() else {
        anyhow::bail!(
            "api_listen {addr}: the remote API needs this node's name (--node-name or \
             NODE_NAME): node-wide routes ask for get nodes/proxy on it"
        );
    };
    let tls = if let (Some(cert), Some(key)) = (&config.api_tls_cert_file, &config.api_tls_key_file)
    {
        Some(tls::acceptor(cert, key)?)
    } else {
        warn!(
            api_listen = %addr,
            "remote API without TLS (api_tls_cert_file, api_tls_key_file unset): bearer \
             tokens and guests' console lines travel in clear"
        );
        None
    };
    Ok(Some(RemoteApi {
        client: source.client.clone(),
        node,
        tls,
    }))
}

/// Binds every configured listener (on the HTTP runtime, which will serve them).
pub(super) async fn bind(
    http: &HttpRuntime,
    config: &Config,
    remote: Option<&RemoteApi>,
) -> anyhow::Result<Vec<Bound>> {
    let listen = config.listen;
    let metrics_listen = config.metrics_listen;
    let socket = config.api_socket.clone();
    let mode = config.api_socket_mode;
    let api_listen = config.api_listen;
    let tls = remote.and_then(|r| r.tls.clone());
    http.spawn(async move {
        let mut bound = vec![Bound {
            server: "listen",
            listener: Listener::Tcp(
                TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?,
            ),
            exposure: Exposure::All,
        }];
        if let Some(addr) = metrics_listen {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (metrics_listen)"))?;
            bound.push(Bound {
                server: "metrics_listen",
                listener: Listener::Tcp(listener),
                exposure: Exposure::Metrics,
            });
        }
        if let Some(path) = socket {
            let listener = Listener::bind_unix(&path, mode)
                .with_context(|| format!("cannot serve the API socket {}", path.display()))?;
            bound.push(Bound {
                server: "api_socket",
                listener,
                exposure: Exposure::All,
            });
        }
        if let Some(addr) = api_listen {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (api_listen)"))?;
            bound.push(Bound {
                server: "api_listen",
                listener: match tls {
                    Some(tls) => Listener::Tls(listener, tls),
                    None => Listener::Tcp(listener),
                },
                exposure: Exposure::Remote,
            });
        }
        Ok(bound)
    })
    .await
    .context("binding the HTTP listeners")?
}

/// `/v1` is unauthenticated: on a non-loopback address only when the operator says so.
pub(super) fn check_exposure(config: &Config) -> anyhow::Result<()> {
    if config.listen.ip().is_loopback() {
        return Ok(());
    }
    if !config.allow_unauthenticated_remote_api {
        anyhow::bail!(
            "--listen {} would serve /v1 (every guest's console) without authentication on a \
             non-loopback address; use --metrics-listen for Prometheus, --api-listen for remote \
             readers (bearer tokens reviewed by Kubernetes) and --api-socket for local \
             readers, or set allow_unauthenticated_remote_api = true \
             (--allow-unauthenticated-remote-api) to accept that",
            config.listen
        );
    }
    warn!(
        listen = %config.listen,
        "serving /v1 without authentication on a non-loopback address \
         (allow_unauthenticated_remote_api): anyone who reaches it reads every guest's console"
    );
    Ok(())
}

/// The guard of the remote API's routes.
fn start_remote(remote: RemoteApi, config: &Config, state: &ApiState) -> Guard {
    let health = &state.exposition.health;
    for [review, outcome] in auth::REVIEWS {
        health.api_reviews.preset(&[review, outcome]);
    }
    for decision in remote::DECISIONS {
        health.api_auth_decisions.preset(&[decision]);
    }
    let reviewer = Reviewer::new(remote.client, remote.node.clone(), &config.kubernetes)
        .counting(health.api_reviews.clone());
    info!(
        node = remote.node.as_str(),
        tls = remote.tls.is_some(),
        "remote API reviews tokens with the Kubernetes API server"
    );
    Guard {
        reviewer: Arc::new(reviewer),
        snapshot: state.snapshot.clone(),
        decisions: health.api_auth_decisions.clone(),
        recheck: Duration::from_secs(config.kubernetes.auth_cache_seconds.max(1)),
    }
}

/// Starts a server on each bound listener (and the remote API's source); the handle ends
/// once all of them have.
pub(super) fn serve(
    http: &HttpRuntime,
    config: &Config,
    bound: Vec<Bound>,
    remote: Option<RemoteApi>,
    state: &ApiState,
    closed: &CounterVec,
    stop: &CancellationToken,
) -> JoinHandle<()> {
    let guard = remote.map(|remote| start_remote(remote, config, state));
    let requests = RequestLimits {
        max_concurrent: config.http.max_concurrent_requests,
        timeout: Duration::from_millis(config.http.request_timeout_ms),
    };
    let connections = ConnectionLimits {
        header_read_timeout: Duration::from_millis(config.http.header_read_timeout_ms),
        max_connections: config.http.max_connections,
    };
    let servers: Vec<JoinHandle<()>> = bound
        .into_iter()
        .map(|b| {
            closed.preset(&[b.server, "evicted"]);
            let router = api::router(state.clone(), b.exposure, requests, guard.clone());
            http.spawn(server::serve(
                b.server,
                b.listener,
                router,
                connections,
                closed.clone(),
                stop.clone(),
            ))
        })
        .collect();
    http.spawn(async move {
        for server in servers {
            let _ = server.await;
        }
    })
}
