//! How the writer thread asks the kernel to schedule it.
//!
//! A writer that syncs small groups back to back costs the machine far more than its own
//! work: each sync blocks the thread on the disk twice (the write, then the cache flush), and
//! each time it wakes it preempts whatever runs on the CPU — in the invocation benchmark on a
//! busy 2-core host, 0.54 syncs and 2.8 context switches an invocation, about 90 µs of kernel
//! time each (see docs/architecture.md). Under `SCHED_BATCH` the thread does not preempt on
//! waking: on an idle CPU it runs at once, but while the CPUs are busy it waits for the
//! running task's slice to end, and the appends that arrive meanwhile join its next group — a
//! commit delay that happens only when the CPUs, not the disk, are what everyone waits for.
//!
//! Only while appends overlap, though. A group of one append with nothing queued behind it
//! when its sync is done is a caller on its own, whose answers a busy CPU would delay with
//! nothing to gain: after such a group the writer takes the normal policy, and keeps it until
//! appends queue up again. (Any group of one would be the wrong test: under load a writer on
//! the normal policy wakes so early that many of its groups hold one append, and it would
//! seldom get back to batch.) And when hundreds of appends wait for each sync, the disk is
//! what they wait for, and a writer that waits for a CPU leaves the disk idle (half the
//! adapter's throughput at 512 appends in flight): after a group that large it goes back to
//! the normal policy too.
//!
//! Only the writer thread's policy changes, and only where it is Linux's default one with
//! the default niceness: a process an operator has started with another policy or niceness
//! (`chrt`, `nice`; threads inherit both) keeps it in its writers too.

/// Groups of this many appends (callers) or more mean the disk is the bottleneck.
const DISK_BOUND_CALLERS: usize = 128;

/// The writer's scheduling policy, switched between groups (one system call a switch; none
/// while the load stays the same).
#[derive(Debug)]
pub(super) struct Pacing {
    enabled: bool,
    batch: bool,
}

impl Pacing {
    /// For the calling (writer) thread, which stays on the normal policy until appends
    /// overlap.
    pub(super) fn start() -> Self {
        Pacing {
            enabled: os::on_default_policy(),
            batch: false,
        }
    }

    /// After the sync of a group of `callers` appends, with more appends `queued` behind it
    /// or not: the policy for the wait for the next group and for its sync's wake-up.
    pub(super) fn after_sync(&mut self, callers: usize, queued: bool) {
        let on_its_own = callers == 1 && !queued;
        self.set_batch(!on_its_own && callers < DISK_BOUND_CALLERS);
    }

    fn set_batch(&mut self, batch: bool) {
        if !self.enabled || self.batch == batch {
            return;
        }
        if os::set_batch(batch) {
            self.batch = batch;
        } else {
            // Refused (a seccomp filter, a container's policy): stay as the thread is.
            self.enabled = false;
        }
    }
}

#[cfg(target_os = "linux")]
mod os {
    use thread_priority::{
        ThreadPriority, ThreadPriorityOsValue,
        unix::{
            NormalThreadSchedulePolicy, ThreadSchedulePolicy, set_thread_priority_and_policy,
            thread_native_id, thread_schedule_policy,
        },
    };

    /// Whether the calling thread has the default policy and niceness (the only state
    /// [`set_batch`] restores).
    pub(super) fn on_default_policy() -> bool {
        matches!(
            thread_schedule_policy(),
            Ok(ThreadSchedulePolicy::Normal(
                NormalThreadSchedulePolicy::Other
            ))
        ) && rustix::process::getpriority_process(None) == Ok(0)
    }

    /// The batch policy, or back to the default one; niceness 0 either way.
    pub(super) fn set_batch(batch: bool) -> bool {
        let policy = if batch {
            NormalThreadSchedulePolicy::Batch
        } else {
            NormalThreadSchedulePolicy::Other
        };
        set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Os(ThreadPriorityOsValue::default()),
            ThreadSchedulePolicy::Normal(policy),
        )
        .is_ok()
    }
}

#[cfg(not(target_os = "linux"))]
mod os {
    pub(super) fn on_default_policy() -> bool {
        false
    }

    pub(super) fn set_batch(_batch: bool) -> bool {
        false
    }
}
