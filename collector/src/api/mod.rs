//! The HTTP API and the CLI's client for it.
//!
//! Routes:
//! - `GET /metrics`: OpenMetrics exposition.
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 once every probe is attached and the start-up scan is done, else 503;
//!   the body lists the probes either way.
//! - `GET /v1/instances`: JSON array of the instances on this host.
//! - `GET /v1/instances/{uuid}`: one instance, 404 if unknown.
//! - `GET /v1/instances/{uuid}/events`: the instance's lifecycle events (NDJSON, oldest first),
//!   kept after it exits; 404 if none.
//! - `GET /v1/events[?follow=true][&instance=UUID]`: all retained lifecycle events, then (with
//!   `follow`) new ones as they happen (NDJSON stream).
//! - `GET /v1/instances/{uuid}/logs?tail=N&since=TS&follow=true&stream=S`: console lines,
//!   NDJSON, streaming with `follow` ([`logs`]).

pub mod client;
pub mod logs;
pub mod server;
pub mod views;
