//! Giving freed heap memory back to the system after a wave of connections has ended.
//!
//! glibc's malloc keeps what connections freed in its arenas for reuse: a proxy that held
//! 9,000 idle connections would keep their memory resident long after they closed. This module
//! owns the one remedy, `malloc_trim(0)` (which returns every whole free page of every arena),
//! and when to use it: once the number of open connections has fallen to half its peak since
//! the last trim, by at least [`TRIM_STEP`] connections, or to zero after at least
//! [`TRIM_STEP_AT_ZERO`]. The trim runs [`SETTLE`] later — after the rest of the wave has
//! closed and its log lines have been written, which are freed only then — on a blocking
//! thread, one at a time, so it never stalls the accept loop or a relay. On other C libraries
//! it does nothing.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// A fall in open connections smaller than this is ordinary churn, not a wave ending.
const TRIM_STEP: usize = 256;
/// When the last connection closes, a peak at least this high is worth a trim.
const TRIM_STEP_AT_ZERO: usize = 32;

/// How long after a wave's end a trim waits for the rest of it.
const SETTLE: Duration = Duration::from_millis(500);

/// The most connections open at once since the last trim.
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// A trim is on its way (it also covers what closes before it runs).
static PENDING: AtomicBool = AtomicBool::new(false);

/// A connection opened; `open_now` are open, this one included.
pub fn opened(open_now: usize) {
    PEAK.fetch_max(open_now, Ordering::Relaxed);
}

/// A connection ended; `open_now` are still open. Must be called within the tokio runtime.
pub fn closed(open_now: usize) {
    let peak = PEAK.load(Ordering::Relaxed);
    if !worth_a_trim(peak, open_now) {
        return;
    }
    PEAK.store(open_now, Ordering::Relaxed);
    if PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(SETTLE).await;
        // Cleared first: a wave that ends while this trim runs gets a trim of its own.
        PENDING.store(false, Ordering::Release);
        let _ = tokio::task::spawn_blocking(trim).await;
    });
}

/// Whether falling from `peak` to `open_now` open connections is the end of a wave.
fn worth_a_trim(peak: usize, open_now: usize) -> bool {
    if open_now == 0 {
        return peak >= TRIM_STEP_AT_ZERO;
    }
    peak >= open_now.saturating_add(TRIM_STEP) && open_now <= peak / 2
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::worth_a_trim;

    #[test]
    fn a_wave_ending_is_worth_a_trim_and_churn_is_not() {
        // 9,000 idle connections closing: trims at half, a quarter, ... and at zero.
        assert!(worth_a_trim(9_000, 4_500));
        assert!(!worth_a_trim(9_000, 4_501));
        assert!(worth_a_trim(4_500, 2_000));
        assert!(worth_a_trim(300, 0));
        // Ordinary churn around a few hundred open connections.
        assert!(!worth_a_trim(300, 200));
        assert!(!worth_a_trim(400, 199), "a fall of 201 is below the step");
        assert!(
            !worth_a_trim(10, 0),
            "a handful of connections is not a wave"
        );
        assert!(!worth_a_trim(0, 0));
    }
}
