//! The pipes splice(2) moves bytes through, from a bounded pool.
//!
//! This module owns the kernel pipes of the splice path: a direction takes one when bytes are
//! ready to move and gives it back, empty, when the direction goes quiet, so an idle connection
//! holds no pipe (and no pipe pages). At most [`MAX_IDLE`] empty pipes are kept for reuse; more
//! are closed. A pipe that still holds bytes (its direction failed) is closed, never reused.
//! Pipes are non-blocking and close-on-exec; each is two descriptors and, while it holds data,
//! up to its capacity in pipe pages. The first [`MAX_ENLARGED`] pipes alive at once get
//! [`ENLARGED_CAPACITY`] (F_SETPIPE_SZ): a sixteenth of the splice calls per GiB of the
//! kernel's default 64 KiB (measured by `make bench`: proxy CPU per GiB 0.34 s with 64 KiB
//! pipes, 0.28 with 256 KiB, 0.25 with 1 MiB). Pipes beyond keep the default,
//! so that the enlarged ones take at most half of `fs.pipe-user-pages-soft` (64 MiB per user by
//! default; past it the kernel gives new pipes only two pages), and a refused F_SETPIPE_SZ just
//! leaves the default.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Empty pipes kept for reuse.
pub const MAX_IDLE: usize = 16;
/// The capacity asked for the first [`MAX_ENLARGED`] pipes alive.
pub const ENLARGED_CAPACITY: usize = 1024 * 1024;
/// Enlarged pipes alive at once: 32 MiB of pipe pages at most.
pub const MAX_ENLARGED: usize = 32;
/// Bytes one splice call into a pipe asks to move; the kernel moves at most what fits.
pub const CHUNK: usize = ENLARGED_CAPACITY;

/// Enlarged pipes alive now (in use or pooled).
static ENLARGED: AtomicUsize = AtomicUsize::new(0);

/// A pipe: its read and write ends.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    /// Counted in [`ENLARGED`] until dropped.
    enlarged: bool,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if self.enlarged {
            ENLARGED.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

static IDLE: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

impl Pipe {
    fn open() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds`.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both were just created and are owned by nothing else.
        let mut pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
                enlarged: false,
            }
        };
        if ENLARGED.fetch_add(1, Ordering::Relaxed) < MAX_ENLARGED {
            // SAFETY: fcntl on a descriptor this pipe owns.
            let set = unsafe {
                libc::fcntl(
                    pipe.write.as_raw_fd(),
                    libc::F_SETPIPE_SZ,
                    ENLARGED_CAPACITY as libc::c_int,
                )
            };
            pipe.enlarged = set >= 0;
        }
        if !pipe.enlarged {
            ENLARGED.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(pipe)
    }

    /// A pipe from the pool, or a new one (EMFILE/ENFILE when the process or system is out of
    /// descriptors: the caller copies instead).
    pub fn take() -> io::Result<Pipe> {
        let reused = IDLE.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match reused {
            Some(pipe) => Ok(pipe),
            None => Pipe::open(),
        }
    }

    /// Returns an empty pipe to the pool (closed if the pool is full).
    pub fn give_back(self) {
        let mut idle = IDLE.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(self);
        }
    }

    pub fn read_fd(&self) -> i32 {
        self.read.as_raw_fd()
    }

    pub fn write_fd(&self) -> i32 {
        self.write.as_raw_fd()
    }
}

/// How many empty pipes the pool holds now.
pub fn idle() -> usize {
    IDLE.lock().unwrap_or_else(|p| p.into_inner()).len()
}

/// splice(2) up to `len` bytes from `from` to `to`, non-blocking.
pub fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two descriptors the caller owns, no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    super::side::cvt(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capacity(pipe: &Pipe) -> usize {
        // SAFETY: fcntl on a descriptor the pipe owns.
        let size = unsafe { libc::fcntl(pipe.write_fd(), libc::F_GETPIPE_SZ) };
        assert!(size > 0, "F_GETPIPE_SZ: {}", io::Error::last_os_error());
        size as usize
    }

    #[test]
    fn an_enlarged_pipe_has_the_capacity_and_is_counted_until_dropped() {
        // Other tests in this process open pipes too, so this holds at most a few and checks
        // what each says of itself rather than the exact global count.
        let pipes: Vec<Pipe> = (0..4).map(|_| Pipe::open().unwrap()).collect();
        for pipe in &pipes {
            if pipe.enlarged {
                assert_eq!(capacity(pipe), ENLARGED_CAPACITY);
                assert!(ENLARGED.load(Ordering::Relaxed) >= 1);
            } else {
                assert!(capacity(pipe) < ENLARGED_CAPACITY);
            }
        }
        assert!(
            pipes.iter().any(|p| p.enlarged),
            "none of 4 pipes was enlarged although at most {MAX_ENLARGED} may be"
        );
        // The kernel takes a whole capacity's worth in one non-blocking call.
        let pipe = pipes.iter().find(|p| p.enlarged).unwrap();
        let data = vec![0x5au8; ENLARGED_CAPACITY];
        // SAFETY: writes from a live buffer into the pipe's write end.
        let wrote = unsafe { libc::write(pipe.write_fd(), data.as_ptr().cast(), data.len()) };
        assert_eq!(
            wrote as usize, ENLARGED_CAPACITY,
            "the pipe took less than its capacity"
        );
        drop(pipes);
    }
}
