//! Records the state file (what `stats`, `report` and the next daemon read) off the reload
//! path. A policy of millions of prefixes takes seconds to list and write; the reload that put
//! it in force hands the writer thread a snapshot and goes on. Only the newest snapshot is
//! written: one queued behind it is dropped, so a burst of reloads writes once, and a slow
//! write never holds up the next reload. The file is replaced by a rename, so a reader (or a
//! daemon killed mid-write) sees the old record or the new one whole.

use std::{
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
    time::Instant,
};

use crate::{
    instance::{Instance, InstanceError, PrefixState, RunState},
    kernel::maps::{CounterIdSnapshot, CounterKey},
    policy::Policy,
    service::metrics::SharedTelemetry,
    source::config::PrefixSeries,
};

/// What a state record is made of: everything but the prefixes, which are listed from the
/// policy and counter ids when the record is written.
pub struct StateJob {
    /// The record, its `prefixes` still empty.
    pub state: RunState,
    pub policy: Arc<Policy>,
    pub counter_ids: CounterIdSnapshot,
    pub prefix_series: PrefixSeries,
}

impl StateJob {
    /// The record whole: one line per prefix that has a counter id.
    fn build(self) -> (RunState, PrefixSeries) {
        let Self {
            mut state,
            policy,
            counter_ids,
            prefix_series,
        } = self;
        let entries: usize = policy.scopes.iter().map(|scope| scope.entries.len()).sum();
        state.prefixes = if entries == counter_ids.len() {
            listed_in_order(&policy, &counter_ids)
        } else {
            // The ids are not this policy's: the maps a boot recovered, enforced while the
            // new policy is built. List what the maps count, named where the policy can.
            counter_ids
                .iter()
                .map(|(scope_id, net, list, counter_id)| {
                    prefix_state(&policy, (scope_id, *net, list), counter_id)
                })
                .collect()
        };
        (state, prefix_series)
    }

    /// Lists the prefixes, writes the file and shares the record with the metrics endpoint.
    pub fn write(
        self,
        instance: &Instance,
        telemetry: &SharedTelemetry,
    ) -> Result<(), InstanceError> {
        // Enforcing where any guarded scope enforces: the top level may audit beside them.
        let mode = self.policy.mode();
        let (state, prefix_series) = self.build();
        instance.write_state(&state)?;
        if let Ok(mut telemetry) = telemetry.lock() {
            telemetry.interfaces = state.interfaces;
            telemetry.mode = mode;
            telemetry.generation = state.generation;
            telemetry.prefixes = state.prefixes;
            telemetry.prefix_series = prefix_series;
        }
        Ok(())
    }
}

/// Every prefix of `policy` with its counter id, scope by scope in prefix order: a walk of the
/// policy and a hash lookup per prefix (a search of the policy per counter id was a third of
/// the record's time at 1M + 1M).
fn listed_in_order(policy: &Policy, counter_ids: &CounterIdSnapshot) -> Vec<PrefixState> {
    (0u32..)
        .zip(&policy.scopes)
        .flat_map(|(scope_id, scope)| {
            let name: Arc<str> = scope.name.as_str().into();
            scope.entries.iter().filter_map(move |(net, entry)| {
                Some(PrefixState {
                    counter_id: counter_ids.get(&(scope_id, *net, entry.list))?,
                    list: entry.list,
                    rule: Arc::clone(&entry.rule),
                    prefix: *net,
                    scope_id,
                    scope: Arc::clone(&name),
                    decided_by: entry.decided_by,
                })
            })
        })
        .collect()
}

/// How `stats`, `report` and the canary's record name the prefix `key` of `policy` and the
/// counter its SYNs count in.
pub fn prefix_state(
    policy: &Policy,
    (scope_id, net, list): CounterKey,
    counter_id: u32,
) -> PrefixState {
    let scope = policy.scopes.get(scope_id as usize);
    let entry = scope.and_then(|scope| scope.entries.get(&net));
    PrefixState {
        counter_id,
        list,
        rule: entry.map_or_else(|| "".into(), |entry| Arc::clone(&entry.rule)),
        prefix: net,
        scope_id,
        scope: scope.map_or_else(|| "default".into(), |scope| scope.name.as_str().into()),
        decided_by: entry.and_then(|entry| entry.decided_by),
    }
}

#[derive(Default)]
struct Queue {
    /// The newest record not yet written.
    next: Option<StateJob>,
    /// A record is being written.
    busy: bool,
    closed: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The thread that writes state records, newest first and only.
pub struct StateWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl StateWriter {
    pub fn new(instance: Instance, telemetry: SharedTelemetry) -> Self {
        let shared = Arc::new(Shared::default());
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("state".to_owned())
            .spawn(move || write_loop(&worker, &instance, &telemetry))
            .ok();
        Self { shared, thread }
    }

    /// Queues `job`, replacing one queued before it that is not being written yet. Without a
    /// thread (it could not be started), the record is written here.
    pub fn submit(&self, job: StateJob, instance: &Instance, telemetry: &SharedTelemetry) {
        if self.thread.is_none() {
            report(
                job.state.generation,
                Instant::now(),
                job.write(instance, telemetry),
            );
            return;
        }
        let superseded = {
            let mut queue = self.shared.lock();
            queue.next.replace(job)
        };
        self.shared.changed.notify_all();
        // A large snapshot can hold the last reference to a replaced policy: freed on the
        // reclaim thread, as the daemon frees what a reload replaces, not on this path.
        crate::reclaim::drop_later(superseded);
    }

    /// Makes way for a newer record the caller writes itself: drops the one queued (it
    /// would be overwritten at once) and waits only for the one being written, so the
    /// caller's lands last. At exit this keeps a large queued policy listing out of the stop
    /// timeout.
    pub fn supersede(&self) {
        if self.thread.is_none() {
            return;
        }
        let queued = self.shared.lock().next.take();
        if let Some(job) = queued {
            crate::reclaim::drop_later(job);
        }
        let mut queue = self.shared.lock();
        while queue.busy {
            queue = self
                .shared
                .changed
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for StateWriter {
    /// Writes what is queued, then stops the thread: the record on disk is the last one.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn write_loop(shared: &Shared, instance: &Instance, telemetry: &SharedTelemetry) {
    loop {
        let job = {
            let mut queue = shared.lock();
            loop {
                if let Some(job) = queue.next.take() {
                    queue.busy = true;
                    break job;
                }
                if queue.closed {
                    return;
                }
                queue = shared
                    .changed
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let generation = job.state.generation;
        let started = Instant::now();
        report(generation, started, job.write(instance, telemetry));
        shared.lock().busy = false;
        shared.changed.notify_all();
    }
}

fn report(generation: u32, started: Instant, outcome: Result<(), InstanceError>) {
    match outcome {
        Ok(()) => log::info!(
            "state of generation {generation} recorded in {:.0} ms",
            started.elapsed().as_secs_f64() * 1e3
        ),
        Err(error) => log::error!(
            "generation {generation} is in force, but the state file could not be written: {error}"
        ),
    }
}
