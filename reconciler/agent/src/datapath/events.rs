//! Reading verdict events from the EVENTS ring buffer, with or without a tokio runtime.
use std::{
    io,
    os::fd::{AsFd, OwnedFd},
};

use aya::maps::{MapData, RingBuf};
use palisade_common::VerdictEvent;
use tokio::io::{Interest, unix::AsyncFd};

/// Events handed out per [`EventReader::next_batch`] call at most; the rest wait for the
/// next call (which then returns at once).
pub const MAX_BATCH: usize = 4096;

/// The consumer side of the EVENTS ring buffer (there must be only one per ring).
pub struct EventReader {
    ring: RingBuf<MapData>,
    /// Registered with the runtime on first use, so the reader can be made outside one.
    async_fd: Option<AsyncFd<OwnedFd>>,
}

impl EventReader {
    pub(crate) fn new(ring: RingBuf<MapData>) -> EventReader {
        EventReader { ring, async_fd: None }
    }

    /// Appends the events available now to `out` (at most [`MAX_BATCH`]) without waiting;
    /// returns how many were appended.
    pub fn drain(&mut self, out: &mut Vec<VerdictEvent>) -> usize {
        drain(&mut self.ring, out)
    }

    /// Waits until at least one event is available, then appends the available ones (at
    /// most [`MAX_BATCH`]) to `out`. Works on a current-thread runtime (actix-rt); needs
    /// the runtime's IO driver.
    pub async fn next_batch(&mut self, out: &mut Vec<VerdictEvent>) -> io::Result<()> {
        let EventReader { ring, async_fd } = self;
        if drain(ring, out) > 0 {
            return Ok(());
        }
        if async_fd.is_none() {
            let fd = ring.as_fd().try_clone_to_owned()?;
            // SAFETY: `fd` is our own duplicate of the ring buffer's descriptor; the AsyncFd
            // owns it and nothing else closes or replaces it.
            *async_fd = Some(unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? });
        }
        let Some(afd) = async_fd.as_ref() else { unreachable!("registered above") };
        loop {
            let mut guard = afd.readable().await?;
            let n = drain(ring, out);
            if n < MAX_BATCH {
                // Drained to empty: the kernel wakes us for the next record.
                guard.clear_ready();
            }
            if n > 0 {
                return Ok(());
            }
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, out: &mut Vec<VerdictEvent>) -> usize {
    let mut n = 0;
    while n < MAX_BATCH {
        let Some(item) = ring.next() else { break };
        if item.len() >= size_of::<VerdictEvent>() {
            // SAFETY: the record holds at least one VerdictEvent, which is plain old data
            // (every bit pattern valid); the read is unaligned-safe.
            let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<VerdictEvent>()) };
            out.push(ev);
            n += 1;
        }
    }
    n
}
