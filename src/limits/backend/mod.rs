//! Where the state replicas share lives: one set of operations (the
//! scripts of [`crate::limits::redis::scripts`], each with a typed argument
//! struct and reply), two backends that carry them out.
//!
//! - [`Memory`]: in this process, each operation's rule in Rust over a
//!   small store of strings, hashes and sorted sets with expiries.
//! - [`RedisClient`]: in Redis, each operation one Lua script, run in one
//!   round trip.
//!
//! The conformance suite (`tests/backend_conformance.rs`) runs the same
//! assertions against both, so the two copies of each rule cannot drift
//! apart unnoticed. The shared limits and the shared bulk state ask a
//! [`Backend`] and do not know which one answers.

pub mod memory;
pub mod store;

pub use memory::{InMemory, Memory};
pub use store::Store;

use crate::limits::redis::SharedError;
pub use crate::limits::redis::client::RedisClient;

/// The backend of the shared state; see the module documentation.
pub enum Backend {
    Memory(Memory),
    Redis(Box<RedisClient>),
}

impl Backend {
    pub fn redis(client: RedisClient) -> Self {
        Self::Redis(Box::new(client))
    }

    /// Carries out one operation.
    pub async fn run<A: InMemory>(&self, keys: &[&str], args: &A) -> Result<A::Reply, SharedError> {
        match self {
            Self::Memory(memory) => Ok(memory.apply(keys, args)),
            Self::Redis(redis) => redis.run(keys, args).await,
        }
    }

    /// Whether the backend answers at all, on a fresh connection.
    pub async fn ping(&self) -> Result<(), SharedError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Redis(redis) => redis.ping().await,
        }
    }
}
