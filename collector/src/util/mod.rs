//! Building blocks without domain knowledge.

pub(crate) mod journal;
pub(crate) mod ttl_cache;
