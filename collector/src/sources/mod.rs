//! Where data enters userspace: discovery (which processes are instances, from the kernel's
//! process events and `/proc`) and console capture (line assembly from the console ring).

pub(crate) mod console;
pub(crate) mod discovery;
