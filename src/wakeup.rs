//! How a core thread wakes an event loop that waits for its queue, without the GIL and without a
//! thread per wait: an eventfd the loop watches (asyncio's `add_reader`), written only when a
//! consumer has said it is about to wait (`arm`), and always when the queue closes or a core
//! thread ends (`wake`).
//!
//! The consumer arms, then looks at the queue once more, and only then waits; the producer
//! queues, then takes the arming. Either the consumer's last look finds the item, or the
//! producer finds it armed and writes: no wake-up is lost, and a producer whose consumer keeps
//! up makes no system call at all. An eventfd stays readable until it is read, so a write made
//! before the loop starts watching is still seen.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
pub struct Wakeup {
    fd: OwnedFd,
    /// Set by a consumer about to wait; taken by the producer that writes.
    armed: AtomicBool,
}

impl Wakeup {
    /// A new eventfd: non-blocking, closed on exec.
    pub fn new() -> io::Result<Wakeup> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Wakeup {
            // SAFETY: just created, owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            armed: AtomicBool::new(false),
        })
    }

    /// Consumer: about to wait. Look at the queue once more after this, then wait.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::Relaxed);
        // Orders the store before the consumer's last look at the queue, as the producer's
        // fence orders its queueing before its look at `armed` (store buffering: both sides
        // need a SeqCst fence).
        fence(Ordering::SeqCst);
    }

    /// Producer: something was queued. Writes only if a consumer armed.
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.armed.load(Ordering::Relaxed) && self.armed.swap(false, Ordering::Relaxed) {
            self.write();
        }
    }

    /// The queue closed, or a core thread ended (a panic kept, its end of the queue dropped):
    /// every waiter must look. Always writes.
    pub fn wake(&self) {
        self.armed.store(false, Ordering::Relaxed);
        self.write();
    }

    /// Consumer: woken; resets the eventfd so it waits again.
    pub fn drain(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into an 8-byte buffer. EAGAIN (already drained) is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
    }

    fn write(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from an 8-byte buffer. It fails only with EAGAIN, when the
        // counter is near 2^64 and so readable already.
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

impl AsFd for Wakeup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn readable(w: &Wakeup) -> bool {
        let mut fds = [libc::pollfd {
            fd: w.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd, length 1.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) == 1 }
    }

    #[test]
    fn notify_writes_only_when_armed_and_once_per_arming() {
        let w = Wakeup::new().unwrap();
        w.notify();
        assert!(!readable(&w), "nobody armed: no write");
        w.arm();
        w.notify();
        assert!(readable(&w));
        w.drain();
        assert!(!readable(&w));
        w.notify();
        assert!(!readable(&w), "the arming was taken by the first notify");
    }

    #[test]
    fn wake_always_writes_and_takes_the_arming() {
        let w = Wakeup::new().unwrap();
        w.wake();
        assert!(readable(&w));
        w.drain();
        w.arm();
        w.wake();
        w.drain();
        w.notify();
        assert!(!readable(&w), "wake took the arming");
    }

    #[test]
    fn no_wakeup_is_lost_between_a_last_look_and_a_wait() {
        // A producer queues 200,000 items one by one; the consumer takes them, and whenever it
        // finds none it arms, looks again, and waits on the fd (never longer than 5 s: a lost
        // wake-up fails the test instead of hanging it).
        let w = Arc::new(Wakeup::new().unwrap());
        let (tx, rx) = crossbeam_channel::unbounded::<u32>();
        const N: u32 = 200_000;
        let producer = {
            let w = Arc::clone(&w);
            std::thread::spawn(move || {
                for i in 0..N {
                    tx.send(i).unwrap();
                    w.notify();
                }
            })
        };
        let mut next = 0;
        while next < N {
            if let Ok(i) = rx.try_recv() {
                assert_eq!(i, next);
                next += 1;
                continue;
            }
            w.arm();
            if let Ok(i) = rx.try_recv() {
                assert_eq!(i, next);
                next += 1;
                continue;
            }
            let mut fds = [libc::pollfd {
                fd: w.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd, length 1.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 5_000) };
            assert_eq!(n, 1, "lost wake-up: item {next} queued, fd never written");
            w.drain();
        }
        producer.join().unwrap();
    }
}
