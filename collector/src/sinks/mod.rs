//! Where instance telemetry leaves the collector.

pub mod console_metrics;
pub mod logs;
pub mod metrics;
