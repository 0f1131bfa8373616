//! Where data enters userspace: discovery (which processes are instances, from the kernel's
//! process events and `/proc`), console capture (line assembly from the console ring) and
//! Kubernetes identity (which Pod backs each instance, and whose it is).

pub(crate) mod console;
pub(crate) mod discovery;
pub(crate) mod kubernetes;
