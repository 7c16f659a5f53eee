//! Polling with a deadline, for tests that wait on state they do not control.

use std::future::Future;
use std::thread;
use std::time::{Duration, Instant};

/// Time between two evaluations of a polled condition.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Result of one evaluation of a polled condition: `true` or `Some(value)` ends the wait.
pub trait PollOutcome {
    /// Value that `wait_until` returns once the condition holds.
    type Output;

    /// Converts the outcome into `Some(output)` when the wait is over.
    fn into_ready(self) -> Option<Self::Output>;
}

impl PollOutcome for bool {
    type Output = ();

    fn into_ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> PollOutcome for Option<T> {
    type Output = T;

    fn into_ready(self) -> Option<T> {
        self
    }
}

/// Evaluates `condition` every 25 ms until it returns `true` or `Some(value)`, and
/// returns that value.
///
/// Panics with "timed out after {timeout} waiting for {what}" when `timeout` passes
/// first. The condition is evaluated at least once, and once more at the deadline.
/// This blocks the calling thread, so inside an async test use `wait_until_async`.
pub fn wait_until<R: PollOutcome>(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> R,
) -> R::Output {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(output) = condition().into_ready() {
            return output;
        }

        let now = Instant::now();
        if now >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(POLL_INTERVAL.min(deadline - now));
    }
}

/// Async form of `wait_until`: awaits `condition()` every 25 ms on the tokio timer.
pub async fn wait_until_async<R, F, Fut>(
    timeout: Duration,
    what: &str,
    mut condition: F,
) -> R::Output
where
    R: PollOutcome,
    F: FnMut() -> Fut,
    Fut: Future<Output = R>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(output) = condition().await.into_ready() {
            return output;
        }

        let now = Instant::now();
        if now >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
}
