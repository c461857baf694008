//! What the kernel says about a server's sockets: how many connections
//! a listener's process holds open, from `/proc/net/tcp`, so a test or a
//! benchmark can tell connections the server has accepted from those still
//! waiting in its accept queue or already closed on its side (the kernel
//! shows those without an inode).
//!
//! The end-to-end tests (`tests/hostile.rs`) and the load harness's
//! hostile scenario (`benches/proxy/scenarios/hostile.rs`) both use it.

use std::collections::HashSet;
use std::fs;

/// Connections accepted on local `port` (IPv4) that the server has not
/// closed yet, all open at one moment.
///
/// The kernel writes `/proc/net/tcp` a page at a time, so one reading can
/// show a socket closed after its line was written next to one accepted
/// before its line was: more connections than were ever open at once. A
/// socket in two readings one after the other was open from the first to
/// the second, so the sockets both show were all open together as the
/// first ended.
pub fn held_connections(port: u16) -> usize {
    let first = accepted_sockets(port);
    accepted_sockets(port).intersection(&first).count()
}

/// The inodes of the sockets accepted on local `port` and not closed when
/// their line of `/proc/net/tcp` was written.
fn accepted_sockets(port: u16) -> HashSet<String> {
    let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let &[_, local, _, state] = fields.get(..4)? else {
                return None;
            };
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|port| u16::from_str_radix(port, 16).ok());
            let listening = state == "0A";
            let inode = fields.get(9).copied().unwrap_or("0");
            (local_port == Some(port) && !listening && inode != "0").then(|| inode.to_owned())
        })
        .collect()
}
