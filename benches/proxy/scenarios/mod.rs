//! The scenarios, each a function from [`Mode`](crate::Mode) to the
//! figures it measured against their targets. Each starts the processes it
//! needs in a temporary directory, drives load at them, prints its tables
//! and, in a smoke run, asserts basic sanity.

pub mod hostile;
pub mod memory;
pub mod pacing;
pub mod pass_through;
pub mod soak;
