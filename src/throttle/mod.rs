//! I/O limits: QEMU's throttle groups, shared by throttle filter nodes on
//! any iothread.

mod group;
mod limits;

pub use group::{release_local, take_local_deadline, Member, ThrottleGroup, ThrottleWait};
pub use limits::{Direction, ThrottleLimits, ThrottleState, VALUE_MAX};
