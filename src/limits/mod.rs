//! The limits engine's building blocks, generic over what they serve and
//! written once for call admission and bulk admission alike.
//!
//! - [`day`]: Marketo's day, its zone and reset, on an injected clock.
//! - [`fair_queue`]: waiters in one lane per service, served fairly by
//!   weight (or a key of the owner's), with deadlines and leaving on drop.
//! - [`backend`]: the shared state's operations, carried out in memory or
//!   in Redis, held to one conformance suite.
//! - [`rules`]: the quota's rule for one more call, for every backend.
//! - [`redis`]: the Lua scripts every count shared through Redis goes
//!   through, and what a Redis error means.
pub mod backend;
pub mod day;
pub mod fair_queue;
pub mod redis;
pub mod rules;
