//! The HTTP side of `collector run`: its own runtime, the listeners it binds, and the rule
//! that keeps `/v1` off non-loopback addresses unless the operator says otherwise.

use std::{future::Future, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    api::{
        self, ApiState, Exposure, RequestLimits,
        server::{self, ConnectionLimits, Listener},
    },
    config::Config,
    model::metrics::CounterVec,
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

/// Binds every configured listener (on the HTTP runtime, which will serve them).
pub(super) async fn bind(http: &HttpRuntime, config: &Config) -> anyhow::Result<Vec<Bound>> {
    let listen = config.listen;
    let metrics_listen = config.metrics_listen;
    let socket = config.api_socket.clone();
    let mode = config.api_socket_mode;
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
             non-loopback address; use --metrics-listen for Prometheus and --api-socket for \
             local readers, or set allow_unauthenticated_remote_api = true \
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

/// Starts a server on each bound listener; the handle ends once all of them have.
pub(super) fn serve(
    http: &HttpRuntime,
    config: &Config,
    bound: Vec<Bound>,
    state: &ApiState,
    closed: &CounterVec,
    stop: &CancellationToken,
) -> JoinHandle<()> {
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
            let router = api::router(state.clone(), b.exposure, requests);
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
