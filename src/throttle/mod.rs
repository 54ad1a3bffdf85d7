//! I/O limits: QEMU's throttle groups, shared by throttle filter nodes on
//! any iothread.

mod group;
mod limits;

pub use group::{Member, ThrottleGroup, ThrottleWait};
pub use limits::{Direction, ThrottleLimits, ThrottleState, VALUE_MAX};
