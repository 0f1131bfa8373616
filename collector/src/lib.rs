//! The compute telemetry collector.
//!
//! Layers, bottom to top; each imports only from the ones below it (`cargo xtask test` checks
//! it from the `use crate::` paths):
//! 1. [`model`], [`config`], [`util`]: the vocabulary, the configuration, generic pieces;
//! 2. [`matching`]: matchers, command-line and allocation parsing, console rules, the kernel
//!    plan;
//! 3. [`host`]: `/proc`, cgroups, VMM config files, the files under the log folder;
//! 4. [`kernel`]: loading the programs, map handles, ring readers and decoders;
//! 5. [`sources`]: discovery and console line assembly;
//! 6. [`registry`]: the one owner of the instances; publishes a snapshot and lifecycle events;
//! 7. [`sinks`]: subscribers and readers (Prometheus, events, console logs);
//! 8. [`api`], then [`runtime`] (start-up and shutdown), then [`cli`].

mod api;
pub mod cli;
mod config;
mod host;
mod kernel;
mod matching;
mod model;
mod registry;
mod runtime;
mod sinks;
mod sources;
mod util;
