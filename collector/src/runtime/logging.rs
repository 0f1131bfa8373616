//! Log set-up: human-readable text for a terminal, JSON lines (stable field names) in production.
//! `RUST_LOG` overrides the level (`info` by default).
//!
//! kube-rs's own lines are off by default: they format values into the message and log a
//! failed request as an error although it is retried (against the logging convention), and
//! the Kubernetes source logs each error it gets from kube-rs itself, once, with the
//! convention's keys. `RUST_LOG=info,kube_client=debug` brings them back.

use tracing_subscriber::{EnvFilter, fmt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

const DEFAULT_FILTER: &str = "info,kube_client=off,kube_runtime=off";

pub(crate) fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_target(false).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}
