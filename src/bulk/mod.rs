//! Bulk jobs: Marketo's extract and import queues, shared by every
//! integration, and the proxy's admission to them.

pub mod endpoint;
