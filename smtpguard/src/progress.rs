//! Progress of long work (resolving many names, fetching lists, building and applying a large
//! policy): nothing is said while a step takes under a second; after that a log line every
//! second says what is being done and how far it got, and a last one says how long it took.
//! A thread of its own does the telling, so a step that blocks (a map write, a slow server)
//! is reported while it runs.

use std::{
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// How long work may take before it is reported, and how often after that.
const QUIET: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Shared {
    done: usize,
    /// What is being waited for now, if the work says.
    current: String,
    finished: bool,
}

/// Reports `what` while it runs for more than a second; dropped when the work is over.
pub struct Progress {
    shared: Arc<(Mutex<Shared>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
    what: String,
    total: usize,
}

impl Progress {
    /// Starts watching `what`, which has `total` steps (0: one step, not counted).
    pub fn start(what: impl Into<String>, total: usize) -> Self {
        let what = what.into();
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let started = Instant::now();
        let thread = {
            let shared = Arc::clone(&shared);
            let what = what.clone();
            std::thread::Builder::new()
                .name("progress".into())
                .spawn(move || tell(&shared, &what, total, started))
                .ok()
        };
        Self {
            shared,
            thread,
            started,
            what,
            total,
        }
    }

    /// One more step is done; `next` says what comes now (shown if it takes long).
    pub fn step(&self, next: &str) {
        if let Ok(mut shared) = self.shared.0.lock() {
            shared.done += 1;
            next.clone_into(&mut shared.current);
        }
    }

    /// Says what is being waited for, without counting a step.
    pub fn now(&self, current: &str) {
        if let Ok(mut shared) = self.shared.0.lock() {
            current.clone_into(&mut shared.current);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        if let Ok(mut shared) = self.shared.0.lock() {
            shared.finished = true;
        }
        self.shared.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if elapsed >= QUIET {
            let steps = if self.total > 0 {
                format!(" ({} steps)", self.total)
            } else {
                String::new()
            };
            log::info!(
                "{}: done in {:.1} s{steps}",
                self.what,
                elapsed.as_secs_f64()
            );
        }
    }
}

/// Logs a line every second until the work is finished.
fn tell(shared: &(Mutex<Shared>, Condvar), what: &str, total: usize, started: Instant) {
    let (lock, wake) = shared;
    let Ok(mut state) = lock.lock() else { return };
    let mut next = started + QUIET;
    loop {
        // Finished before this thread first waited: the wake-up is gone, the flag is not.
        if state.finished {
            return;
        }
        let now = Instant::now();
        if now < next {
            let Ok((guard, _)) = wake.wait_timeout(state, next - now) else {
                return;
            };
            state = guard;
            if state.finished {
                return;
            }
            continue;
        }
        if state.finished {
            return;
        }
        let count = if total > 0 {
            format!(" {} of {total} done,", state.done)
        } else {
            String::new()
        };
        let current = if state.current.is_empty() {
            String::new()
        } else {
            format!(" now {},", state.current)
        };
        log::info!(
            "{what}:{count}{current} {:.0} s so far",
            started.elapsed().as_secs_f64()
        );
        next += QUIET;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_work_costs_nothing() {
        // The reporting thread must not hold the end of quick work back.
        let started = Instant::now();
        for _ in 0..20 {
            let progress = Progress::start("quick", 2);
            progress.step("next");
            progress.step("");
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }
}
