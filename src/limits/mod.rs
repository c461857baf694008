//! The limits engine's building blocks, generic over what they serve and
//! written once for call admission and bulk admission alike.
//!
//! - [`day`]: Marketo's day, its zone and reset, on an injected clock.
//! - [`redis`]: the Lua scripts every count shared through Redis goes
//!   through, and what a Redis error means.
pub mod day;
pub mod redis;
