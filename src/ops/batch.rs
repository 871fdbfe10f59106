//! The rhythm of the log writer threads: drain whatever has queued up, write it as one batch,
//! then pause before waiting again.
//!
//! Why the pause: a writer thread that blocks on its queue is woken by every line logged while
//! it waits, and at the default level a busy proxy logs one line per connection. On a parent
//! with two vCPUs those wake-ups (a futex wake, two context switches and a write per line) cost
//! more than formatting the lines. A thread that pauses after each batch is not waiting on the
//! queue meanwhile, so logging a line costs the connection's task a push onto the queue and
//! nothing more; the thread then takes everything queued in one go. When the log is quiet, the
//! next line wakes it at once, so a lone line (an error at start-up, a refusal) is never held
//! back; under load a line waits at most [`PAUSE`]. The queues stay bounded and lossy: a full
//! queue drops the line and counts it, it never blocks the caller.

use std::time::Duration;

use crossbeam_channel::Receiver;

/// How long a writer thread pauses after a batch: at most this many milliseconds' lines wait,
/// and a busy log costs at most about 1 s / PAUSE wake-ups a second.
pub const PAUSE: Duration = Duration::from_millis(10);

/// Waits for the next message, then hands it and every message queued behind it to `each`.
/// Returns `false` once every sender is gone and the queue is empty (the thread's end).
pub fn drain<T>(queue: &Receiver<T>, mut each: impl FnMut(T)) -> bool {
    let Ok(first) = queue.recv() else {
        return false;
    };
    each(first);
    for message in queue.try_iter() {
        each(message);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_everything_queued_and_the_end_is_an_empty_closed_queue() {
        let (send, queue) = crossbeam_channel::bounded(8);
        for n in 0..3 {
            send.send(n).unwrap();
        }
        let mut seen = Vec::new();
        assert!(drain(&queue, |n| seen.push(n)));
        assert_eq!(seen, [0, 1, 2]);
        send.send(3).unwrap();
        drop(send);
        assert!(
            drain(&queue, |n| seen.push(n)),
            "what was queued before the end"
        );
        assert_eq!(seen, [0, 1, 2, 3]);
        assert!(!drain(&queue, |n| seen.push(n)));
    }
}
