//! The compute telemetry collector.
//!
//! The folders follow the data path: [`ebpf`] (kernel programs, loading, ring readers) ->
//! [`decode`] (records to typed events) -> [`discovery`] (which processes are instances) ->
//! [`registry`] (the one owner of instance state) -> [`sinks`] (metrics) -> [`api`] (HTTP).
//! [`telemetry`] is the collector's own health; [`daemon`] wires it all.

pub mod api;
pub mod clock;
pub mod config;
pub mod console;
pub mod daemon;
pub mod decode;
pub mod discovery;
pub mod ebpf;
pub mod registry;
pub mod sinks;
pub mod telemetry;
