//! The vocabulary every layer shares: instances and the labels that name them, process and
//! lifecycle events, console records, metric families and the collector's own counters.
//! Imports nothing else of the crate.

pub(crate) mod console;
pub(crate) mod console_stats;
pub(crate) mod export_stats;
pub(crate) mod health;
pub(crate) mod identity;
pub(crate) mod instance;
pub(crate) mod lifecycle;
pub(crate) mod metrics;
pub(crate) mod probe;
pub(crate) mod process;
pub(crate) mod time;
