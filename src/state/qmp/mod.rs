//! The QMP commands on State itself, as typed handlers (`crate::qapi`):
//! exports and their statistics, and user-creatable objects (throttle
//! groups, which live in State's graph; throttle/ sits below State, so
//! their commands are here). The monitor (`crate::qmp`) lists these tables
//! with the other subsystems'; State's own code names nothing of QMP.

pub mod exports;
pub mod objects;
