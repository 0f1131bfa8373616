//! Where instance telemetry leaves the collector.

pub mod metrics;
pub mod usage;
