//! Where instance telemetry leaves the collector.

pub mod console_metrics;
pub mod events;
pub mod files;
pub mod logs;
pub mod metrics;
pub mod usage;
