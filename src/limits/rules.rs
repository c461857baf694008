//! The rules of the day's quota that hold whatever keeps the counts:
//! this replica's own quota, the memory backend and (in Lua) the Redis
//! backend's acquire script apply them in the same order.

/// Which daily limit a call ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaScope {
    /// The instance's quota is spent (or Marketo said 607).
    Instance,
    /// The service's own `daily_quota` cap is spent.
    ServiceCap,
    /// What is left is reserved for other services.
    Reserved,
}

/// The day's rule for one more call of a service: the instance has
/// calls left, the service is under its cap, and what is left is more
/// than the others' reserves still hold. Every backend that counts in Rust
/// asks it; the Redis backend's script says the same in Lua.
pub fn one_more_call(remaining: u64, used: u64, cap: u64, held_for_others: u64) -> Result<(), QuotaScope> {
    if remaining == 0 {
        Err(QuotaScope::Instance)
    } else if used >= cap {
        Err(QuotaScope::ServiceCap)
    } else if remaining <= held_for_others {
        Err(QuotaScope::Reserved)
    } else {
        Ok(())
    }
}

/// What reserves still hold back: of each `(reserved, used)`, what is not
/// used yet.
pub fn held_for_others(reserves: impl IntoIterator<Item = (u64, u64)>) -> u64 {
    reserves
        .into_iter()
        .map(|(reserved, used)| reserved.saturating_sub(used))
        .sum()
}
