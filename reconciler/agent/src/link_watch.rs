//! Link removals from netlink (`RTMGRP_LINK`), so that an endpoint whose interface
//! disappears (a pod deleted abruptly) is removed at once rather than at the next periodic
//! check: [`link_removed`] decodes a datagram of route netlink messages, and
//! [`watch_link_removals`] listens on a thread of its own.
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket};

/// The multicast group of link changes.
const RTMGRP_LINK: u32 = 1;
/// The message type of a link removed.
const RTM_DELLINK: u16 = 17;
/// `struct nlmsghdr`: u32 length, u16 type, u16 flags, u32 seq, u32 pid.
const HEADER: usize = 16;

/// Whether the netlink messages in `buf` (one datagram: messages back to back, each
/// starting with its header, 4-byte aligned) report a link removed. A truncated or
/// malformed message ends the walk.
pub fn link_removed(buf: &[u8]) -> bool {
    let mut off = 0;
    while off + HEADER <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        if u16::from_ne_bytes([buf[off + 4], buf[off + 5]]) == RTM_DELLINK {
            return true;
        }
        if len < HEADER {
            return false;
        }
        off += (len + 3) & !3;
    }
    false
}

/// Listens for link removals on a thread of its own and calls `removed` on each (and when
/// messages were lost, since one may have been a removal); the listener ends when `removed`
/// answers false. Without netlink (no socket, no permission) it says so and returns: the
/// periodic check remains.
pub fn watch_link_removals(removed: impl Fn() -> bool + Send + 'static) {
    let sock = match socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no netlink socket; vanished interfaces are found by the periodic check only");
            return;
        }
    };
    if let Err(e) = bind(sock.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK)) {
        tracing::warn!(error = %e, "cannot listen for link changes; vanished interfaces are found by the periodic check only");
        return;
    }
    let spawned = std::thread::Builder::new().name("link-watch".into()).spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                // Messages were lost: check anyway.
                Err(Errno::ENOBUFS) => {
                    if !removed() {
                        return;
                    }
                    continue;
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "netlink listener stopped; the periodic check remains");
                    return;
                }
            };
            if link_removed(&buf[..n]) && !removed() {
                return;
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the netlink listener; the periodic check remains");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message of type `kind` saying it is `len` bytes long (header included); at least a
    /// header's bytes.
    fn message(kind: u16, len: usize) -> Vec<u8> {
        let mut m = vec![0u8; len.max(HEADER)];
        m[..4].copy_from_slice(&(len as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m
    }

    const RTM_NEWLINK: u16 = 16;

    #[test]
    fn a_removal_is_found_among_other_messages() {
        let mut dgram = message(RTM_NEWLINK, 30);
        dgram.extend([0, 0]); // padding to 4 bytes
        dgram.extend(message(RTM_DELLINK, 20));
        assert!(link_removed(&dgram));
        assert!(!link_removed(&message(RTM_NEWLINK, 32)));
        assert!(!link_removed(&[]));
    }

    #[test]
    fn malformed_messages_end_the_walk() {
        // A length below the header would loop forever if followed.
        let mut dgram = message(RTM_NEWLINK, 4);
        dgram.extend(message(RTM_DELLINK, 16));
        assert!(!link_removed(&dgram));
        // A truncated header is not read.
        assert!(!link_removed(&message(RTM_DELLINK, 16)[..12]));
    }
}
