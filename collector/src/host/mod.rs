//! The host, read and written directly: `/proc` and cgroup files, VMM configuration files, and
//! the per-instance files under the log folder. Every parser of a host file is here.

pub(crate) mod exe_trust;
pub(crate) mod files;
pub(crate) mod memcg;
pub(crate) mod names;
pub(crate) mod privileges;
pub(crate) mod proc;
pub(crate) mod vmm_config;
