//! How the JSONL writer thread asks to be scheduled (`jsonl/pacing.rs`): the batch policy
//! while appends overlap in small groups, so that its wake-ups after each sync do not preempt
//! the callers' work; the normal policy for an append on its own (nothing queued behind it),
//! and after a group of many appends, when the disk is what they wait for.
#![cfg(target_os = "linux")]

use std::{path::Path, sync::Arc};

use eventlog::{EventLog, ExpectedVersion, jsonl::JsonlLog};
use proto::v1::Envelope;

use crate::{
    jsonl_recovery::{Script, StopHoldingOnDrop, answer, open_scripted, start_append},
    support::{event, subject, this_thread_dir},
};

const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;
/// Overlapping appends, fewer than the writer's threshold for a disk-bound group (128).
const FEW: usize = 10;
/// More than that threshold.
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

/// Has `n` appends written as one group: they queue behind a held sync, and are answered
/// after one more sync.
async fn group_of(log: &JsonlLog, script: &Arc<Script>, n: usize) {
    script.hold();
    let entered = script.syncs_started();
    let first = [event("pacing")];
    let held = start_append(log, &first);
    script.syncs_entered(entered + 1).await;
    let appends: Vec<[Envelope; 1]> = (0..n).map(|_| [event("pacing")]).collect();
    // Outside the runtime's cooperative budget, which would turn a queueing send into
    // `Pending` after a hundred or so in one poll.
    let queued: Vec<_> = tokio::task::unconstrained(async {
        appends.iter().map(|e| start_append(log, e)).collect()
    })
    .await;
    script.stop_holding();
    answer(held).await.expect("the held append");
    for append in queued {
        answer(append).await.expect("append");
    }
    assert_eq!(
        script.syncs_started(),
        entered + 2,
        "the {n} queued appends were one group, one sync"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_runs_as_batch_only_while_appends_overlap_in_groups_below_128() {
    // The writer inherits its opener's policy and niceness, and changes only the default
    // ones; a test process started otherwise could not show the switch.
    let own = this_thread_dir().expect("/proc/thread-self");
    assert_eq!(
        policy_of(&own),
        SCHED_OTHER,
        "this test needs to run on the default scheduling policy"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let (log, script) = open_scripted(dir.path()).await;
    let _stop_holding = StopHoldingOnDrop(script.clone());
    let single = || async {
        log.append(
            &subject("server.pacing"),
            ExpectedVersion::Any,
            &[event("pacing")],
        )
        .await
        .expect("append");
    };

    // Each policy is set after the group's sync, before its callers are answered. In a
    // `group_of`, the held append has the others queued behind it: it sets batch too.
    single().await;
    let writer = script.writer_thread().expect("the writer synced");
    assert_eq!(policy_of(&writer), SCHED_OTHER, "an append on its own");

    // A group of one with another append queued behind it: they overlap. Its policy is
    // looked at while the queued append's own sync is held, before that group decides again.
    script.hold();
    let entered = script.syncs_started();
    let (first, second) = ([event("pacing")], [event("pacing")]);
    let held = start_append(&log, &first);
    script.syncs_entered(entered + 1).await;
    let queued = start_append(&log, &second);
    script.release(1);
    answer(held).await.expect("the held append");
    script.syncs_entered(entered + 2).await;
    assert_eq!(
        policy_of(&writer),
        SCHED_BATCH,
        "one append, another queued behind its sync"
    );
    script.stop_holding();
    answer(queued).await.expect("the queued append");
    assert_eq!(
        policy_of(&writer),
        SCHED_OTHER,
        "the queued one had nothing behind it"
    );
    group_of(&log, &script, FEW).await;
    assert_eq!(policy_of(&writer), SCHED_BATCH, "a group of {FEW}");
    single().await;
    assert_eq!(policy_of(&writer), SCHED_OTHER, "on its own again");
    group_of(&log, &script, FEW).await;
    assert_eq!(policy_of(&writer), SCHED_BATCH, "a group of {FEW} again");
    group_of(&log, &script, MANY).await;
    assert_eq!(policy_of(&writer), SCHED_OTHER, "a group of {MANY}");
    log.close().await;
}
