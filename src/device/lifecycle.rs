//! One device made or destroyed at a time in this process.
//!
//! The Vulkan loader keeps every instance's logical devices in process-wide lists that
//! `vkCreateDevice` reads under a lock and `vkCreateDevice`/`vkDestroyDevice` change without
//! one, so a device made on one thread while another thread destroys one can read freed memory
//! ([KhronosGroup/Vulkan-Loader#2018](https://github.com/KhronosGroup/Vulkan-Loader/issues/2018);
//! a separate instance per thread does not help). NVIDIA's driver is reported to crash on
//! concurrent device creation and destruction as well
//! ([kvark/blade#336](https://github.com/kvark/blade/issues/336)). Groups are made and dropped
//! on many threads at once (tests run in parallel; a process may hold several jobs), so wccl
//! takes a turn around what it opens (discovery, [`RankDevice::open`](super::RankDevice::open))
//! and around dropping a communicator's device work.
//!
//! A device is destroyed when the last handle on it goes. That is inside the communicator's
//! turn when the communicator holds the last one (its device, queue, buffers and pipelines), as
//! in a group dropped whole. A caller's handle that outlives it (a [`DeviceBuffer`]
//! still held, a clone of the device, a device passed in with
//! [`RankDevice::from_wgpu`](super::RankDevice::from_wgpu)) destroys the device later, outside
//! any turn, as do the devices a failed [`GroupBuilder::build`](crate::GroupBuilder::build)
//! had opened: this narrows the race to those cases, it does not close it.
//!
//! [`DeviceBuffer`]: super::DeviceBuffer
//!
//! A turn is a flag, not a held `MutexGuard`, so that the value that releases it can be kept in
//! a `Send` struct. Waiting for a turn has a deadline: a thread stuck in a driver call must not
//! stop every other thread from making a device forever; past it the waiter goes ahead without
//! a turn (the race is then possible again, a hang is not).

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::deadline::deadline_after;

/// How long a thread waits for its turn before going ahead without one.
const TURN_DEADLINE: Duration = Duration::from_secs(60);

static BUSY: Mutex<bool> = Mutex::new(false);
static FREED: Condvar = Condvar::new();

/// This thread's turn to make or destroy devices, released on drop.
#[derive(Debug)]
#[must_use = "the turn lasts while the value lives"]
pub(crate) struct Turn {
    /// Whether this value took the flag (false: the wait ran past its deadline).
    held: bool,
}

/// Waits (at most [`TURN_DEADLINE`]) until no other thread makes or destroys a device, then
/// takes the turn.
pub(crate) fn turn() -> Turn {
    let deadline = deadline_after(TURN_DEADLINE);
    let mut busy = BUSY.lock().unwrap_or_else(PoisonError::into_inner);
    while *busy {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            tracing::warn!(
                "no turn to make or destroy a device within {TURN_DEADLINE:?}: going ahead"
            );
            return Turn { held: false };
        }
        busy = FREED
            .wait_timeout(busy, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    *busy = true;
    Turn { held: true }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.held {
            *BUSY.lock().unwrap_or_else(PoisonError::into_inner) = false;
            FREED.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Threads taking turns never overlap: a count of holders never exceeds one.
    #[test]
    fn turns_never_overlap() {
        let inside = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let t = turn();
                        assert!(t.held);
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(t);
                    }
                });
            }
        });
        assert_eq!(most.load(Ordering::SeqCst), 1);
    }
}
