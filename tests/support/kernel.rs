//! What the kernel says about a server's sockets: how many connections
//! a listener's process holds open, from `/proc/net/tcp`, so a test or a
//! benchmark can tell connections the server has accepted from those still
//! waiting in its accept queue or already closed on its side (the kernel
//! shows those without an inode).
//!
//! The end-to-end tests (`tests/hostile.rs`) and the load harness's
//! hostile scenario (`benches/proxy/scenarios/hostile.rs`) both use it.

use std::fs;

/// Connections accepted on local `port` (IPv4) that the server has not
/// closed yet.
pub fn held_connections(port: u16) -> usize {
    let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(&[_, local, _, state]) = fields.get(..4) else {
                return false;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|port| u16::from_str_radix(port, 16).ok());
            let listening = state == "0A";
            let inode = fields.get(9).copied().unwrap_or("0");
            local_port == Some(port) && !listening && inode != "0"
        })
        .count()
}
