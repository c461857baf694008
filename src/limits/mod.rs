//! The limits engine's building blocks, generic over what they serve and
//! written once for call admission and bulk admission alike.
//!
//! - [`day`]: Marketo's day, its zone and reset, on an injected clock.
pub mod day;
