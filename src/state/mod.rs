//! The daemon's runtime state: the block graph, the exports, and the
//! subsystems registered to take part in drained sections. It knows
//! nothing of QMP nor of the process (see `shell`).

mod participant;

pub use participant::{Busy, DrainParticipant, Resume};
