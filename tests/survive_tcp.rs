//! The tests of `survive.rs` over loopback TCP sockets: `Checksummed<FaultyLink<TcpLink>>`,
//! through the transport that crosses processes.

use wccl::link::{LinkStack, TcpOptions};

/// TCP at the bottom of every group's stack in the included tests.
pub fn base_stack() -> LinkStack {
    LinkStack::new().tcp(TcpOptions::default())
}

#[path = "survive.rs"]
mod over_tcp;
