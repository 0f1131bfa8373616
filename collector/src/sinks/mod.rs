//! Where instance telemetry leaves the collector.

pub mod events;
pub mod files;
pub mod metrics;
pub mod usage;
