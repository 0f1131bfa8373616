//! Where data leaves the collector. Each sink is a subscriber of a source or of the registry,
//! or a reader of their handles, and never imports a sibling.

pub(crate) mod console_logs;
pub(crate) mod events;
pub(crate) mod otlp;
pub(crate) mod prometheus;
pub(crate) mod state;
