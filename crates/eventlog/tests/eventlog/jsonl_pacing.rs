//! How the JSONL writer thread asks to be scheduled (`jsonl/pacing.rs`): the batch policy
//! while its groups are small, so that its wake-ups after each sync do not preempt the
//! callers' work; the normal policy after a group of many appends, when the disk is what they
//! wait for; and back.
#![cfg(target_os = "linux")]

use std::path::Path;

use eventlog::{EventLog, ExpectedVersion};
use proto::v1::Envelope;

use crate::{
    jsonl::GUARD,
    jsonl_recovery::{StopHoldingOnDrop, open_scripted, start_append},
    support::{event, subject},
};

const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;
/// More than the writer's threshold for a disk-bound group (128 callers).
const MANY: usize = 200;

/// The scheduling policy of the thread at `dir` (`/proc/<pid>/task/<tid>`): field 41 of its
/// `stat`, counted after the parenthesised name, which may hold spaces.
fn policy_of(dir: &Path) -> u32 {
    let stat = std::fs::read_to_string(dir.join("stat")).expect("read the thread's stat");
    let (_, after_name) = stat.rsplit_once(')').expect("a stat line");
    after_name
        .split_whitespace()
        .nth(41 - 3)
        .expect("the policy field")
        .parse()
        .expect("a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_runs_as_batch_while_groups_are_small_and_normal_after_a_large_one() {
    // The writer inherits its opener's policy and niceness, and changes only the default
    // ones; a test process started otherwise could not show the switch.
    let own = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
    assert_eq!(
        policy_of(&Path::new("/proc").join(own)),
        SCHED_OTHER,
        "this test needs to run on the default scheduling policy"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, script) = open_scripted(dir.path()).await;
    let _stop_holding = StopHoldingOnDrop(script.clone());
    let s = subject("server.pacing");

    // One append at a time: batch.
    log.append(&s, ExpectedVersion::Any, &[event("pacing")])
        .await
        .expect("append");
    let writer = script.writer_thread().expect("the writer synced");
    assert_eq!(
        policy_of(&writer),
        SCHED_BATCH,
        "after a group of one append"
    );

    // A group of many appends: they queue behind a held sync and are written together.
    script.hold();
    let entered = script.syncs_started();
    let first = [event("pacing")];
    let held = start_append(&log, &first);
    script.syncs_entered(entered + 1).await;
    let many: Vec<[Envelope; 1]> = (0..MANY).map(|_| [event("pacing")]).collect();
    // Outside the runtime's cooperative budget, which would turn a queueing send into
    // `Pending` after a hundred or so in one poll.
    let queued: Vec<_> =
        tokio::task::unconstrained(async { many.iter().map(|e| start_append(&log, e)).collect() })
            .await;
    script.stop_holding();
    tokio::time::timeout(GUARD, held)
        .await
        .expect("stalled")
        .expect("the held append");
    let mut last_sequences = Vec::with_capacity(MANY);
    for append in queued {
        let outcome = tokio::time::timeout(GUARD, append)
            .await
            .expect("stalled")
            .expect("append");
        last_sequences.push(outcome.last_sequence);
    }
    assert_eq!(
        script.syncs_started(),
        entered + 2,
        "the {MANY} queued appends were one group, one sync"
    );
    assert_eq!(last_sequences.len(), MANY);
    assert_eq!(
        policy_of(&writer),
        SCHED_OTHER,
        "after a group of {MANY} appends, before they were answered"
    );

    // Small groups again: batch again.
    log.append(&s, ExpectedVersion::Any, &[event("pacing")])
        .await
        .expect("append");
    assert_eq!(
        policy_of(&writer),
        SCHED_BATCH,
        "after a group of one again"
    );
    log.close().await;
}
