//! Building blocks without domain knowledge.

pub(crate) mod journal;
