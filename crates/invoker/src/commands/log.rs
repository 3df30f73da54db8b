//! An invocation's events in the log: written (once per settling event), found, read, waited
//! on, and the report they make.

use std::{sync::Arc, time::Duration};

use domain::{Aggregate, Event};
use domain::{
    InvocationId, UserId,
    invocation::{self, InvocationState, InvocationStatus, Settles, invocation_id_of},
};
use eventlog::{EventLogError, ExpectedVersion, LogKind, Subject, SubjectFilter};
use futures_util::StreamExt;
use proto::v1::Envelope;
use service_kit::CommandContext;

use super::{InvocationReport, Outcome, Settled, Whereabouts, captured_result, invocation_subject};
use crate::{Invoker, InvokerError, ResultEnvelope};

/// How long a look-up waits for the open invocations read model to reach the log's end.
const INDEX_CATCH_UP: Duration = Duration::from_secs(5);

impl Invoker {
    /// The current outcome of `user`'s invocation `id`; with `wait`, waits up to that long
    /// for a final one (through an approval too).
    pub async fn status(
        &self,
        user: &UserId,
        id: &InvocationId,
        wait: Duration,
    ) -> Result<InvocationReport, InvokerError> {
        let Some(known) = self.whereabouts(user, id).await? else {
            return Err(domain::DomainError::InvocationNotFound.into());
        };
        let (events, seen) = self.load(user, id, known).await?;
        self.await_outcome(user, id, seen, events, wait, true).await
    }

    /// The report of the invocation as `events` describe it.
    pub(crate) fn report(
        &self,
        user: &UserId,
        id: &InvocationId,
        events: &[Event],
    ) -> InvocationReport {
        let state = InvocationState::from_events(events.iter());
        self.report_of(&state, user, id, events, None)
    }

    /// [`Invoker::report`] for `state`, the invocation as `events` describe it, and its
    /// `result` where the caller has it at hand (else a completed one's is looked up).
    pub(super) fn report_of(
        &self,
        state: &InvocationState,
        user: &UserId,
        id: &InvocationId,
        events: &[Event],
        result: Option<Arc<ResultEnvelope>>,
    ) -> InvocationReport {
        let mut report = InvocationReport {
            invocation_id: id.as_str().to_owned(),
            outcome: Outcome::Running,
            reason: None,
            message: None,
            result: None,
        };
        for event in events {
            match event {
                Event::InvocationRejected(e) => {
                    report.reason = Some(e.reason_code.clone());
                    report.message = Some(e.message.clone());
                }
                Event::InvocationFailed(e) => {
                    report.reason = Some(e.error_code.clone());
                    report.message = Some(e.message.clone());
                }
                Event::InvocationDenied(e) if e.withdrawn => {
                    report.reason = Some("withdrawn".to_owned());
                    report.message =
                        Some("the orchestrator withdrew the request before a decision".to_owned());
                }
                Event::InvocationDenied(e) => {
                    report.reason = Some("denied_by_user".to_owned());
                    report.message = (!e.reason.is_empty()).then(|| e.reason.clone());
                }
                Event::InvocationExpired(_) => {
                    report.reason = Some("approval_expired".to_owned());
                }
                // Captured whole. (Cut to fit the event, it names the process holding the
                // whole result: that one is asked first.)
                Event::InvocationCompleted(e)
                    if e.result_held_by.is_empty() && result.is_none() =>
                {
                    report.result = captured_result(e);
                }
                _ => {}
            }
        }
        report.outcome = match state.status() {
            InvocationStatus::NotRequested
            | InvocationStatus::Ready { .. }
            | InvocationStatus::Running => Outcome::Running,
            InvocationStatus::AwaitingApproval { .. } => Outcome::AwaitingApproval,
            InvocationStatus::Rejected { .. } => Outcome::Rejected,
            InvocationStatus::Denied => Outcome::Denied,
            InvocationStatus::Expired => Outcome::Expired,
            InvocationStatus::Completed { .. } => Outcome::Completed,
            InvocationStatus::Failed { .. } => Outcome::Failed,
        };
        if report.outcome == Outcome::Completed && report.result.is_none() {
            report.result = result.or_else(|| self.remembered_result(user, id.as_str()));
        }
        report
    }

    /// Envelopes for `user`'s invocation `id`: each event that settles something carries the
    /// event id every competing writer derives, and a `write_id` of its own.
    pub(crate) fn envelopes(
        &self,
        context: &CommandContext,
        user: &UserId,
        id: &InvocationId,
        events: Vec<Event>,
    ) -> Vec<Envelope> {
        let mut envelopes = self.inner.envelopes.wrap(context, events);
        for envelope in &mut envelopes {
            if let Some(settles) = envelope.event.as_ref().and_then(Settles::of) {
                envelope.write_id = std::mem::replace(
                    &mut envelope.event_id,
                    invocation::settling_event_id(user, id, settles),
                );
            }
        }
        envelopes
    }

    /// Appends an envelope from [`Invoker::envelopes`] that settles something: stored once
    /// per invocation whoever writes it, so this finds out whose is stored.
    pub(super) async fn append_settling(
        &self,
        subject: &Subject,
        envelope: &Envelope,
    ) -> Result<Settled, InvokerError> {
        let log = &self.inner.log;
        let appended = log
            .append(
                subject,
                ExpectedVersion::Any,
                std::slice::from_ref(envelope),
            )
            .await?;
        if !appended.duplicate {
            return Ok(Settled::Ours(appended.last_sequence));
        }
        // Stored before: by an earlier attempt of this very write (a lost acknowledgement),
        // or by a competitor.
        let stored = log
            .read_event(LogKind::Invocations, appended.last_sequence)
            .await?;
        Ok(match stored {
            Some(stored)
                if stored.envelope.event_id == envelope.event_id
                    && stored.envelope.write_id == envelope.write_id =>
            {
                Settled::Ours(appended.last_sequence)
            }
            _ => Settled::Theirs(appended.last_sequence),
        })
    }

    /// Appends `envelopes` one by one, in order (one event a write: a batch costs
    /// milliseconds on JetStream): the last one's sequence, or `None` when one that settles
    /// something was settled by a competitor first, and nothing after it was written.
    pub(crate) async fn append_all(
        &self,
        subject: &Subject,
        envelopes: &[Envelope],
    ) -> Result<Option<u64>, InvokerError> {
        let mut last = None;
        for envelope in envelopes {
            if envelope.write_id.is_empty() {
                let appended = self
                    .inner
                    .log
                    .append(
                        subject,
                        ExpectedVersion::Any,
                        std::slice::from_ref(envelope),
                    )
                    .await?;
                last = Some(appended.last_sequence);
            } else {
                match self.append_settling(subject, envelope).await? {
                    Settled::Ours(sequence) => last = Some(sequence),
                    Settled::Theirs(_) => return Ok(None),
                }
            }
        }
        Ok(last)
    }

    /// Where `user`'s invocation `id` is, as this process's read model knows it now.
    pub(crate) fn whereabouts_now(&self, user: &UserId, id: &InvocationId) -> Option<Whereabouts> {
        self.inner.read_models.open_invocations.read(|open| {
            open.locate(user.as_str(), id.as_str())
                .map(Whereabouts::from)
        })
    }

    /// Where `user`'s invocation `id` is, once the read model has everything the log held
    /// when asked (the invocation may have been requested on another process a moment ago).
    pub(super) async fn whereabouts(
        &self,
        user: &UserId,
        id: &InvocationId,
    ) -> Result<Option<Whereabouts>, InvokerError> {
        let end = self.inner.log.last_sequence(LogKind::Invocations).await?;
        let models = &self.inner.read_models;
        if !models
            .wait_for_position(LogKind::Invocations, end, INDEX_CATCH_UP)
            .await
        {
            return Err(EventLogError::Unavailable {
                reason: "the open invocations read model is behind the log; try again".to_owned(),
            }
            .into());
        }
        Ok(self.whereabouts_now(user, id))
    }

    /// The invocation's events as recorded, and the last sequence read: a finished one's
    /// request and outcome (two point reads), an open one's events from its request on.
    pub(crate) async fn load(
        &self,
        user: &UserId,
        id: &InvocationId,
        known: Whereabouts,
    ) -> Result<(Vec<Event>, u64), InvokerError> {
        let log = &self.inner.log;
        if let Some(outcome_sequence) = known.outcome_sequence {
            let mut events = Vec::with_capacity(2);
            for sequence in [known.requested_sequence, outcome_sequence] {
                if let Some(event) = log
                    .read_event(LogKind::Invocations, sequence)
                    .await?
                    .and_then(|recorded| recorded.envelope.event)
                {
                    events.push(event);
                }
            }
            return Ok((events, outcome_sequence));
        }
        let subject = invocation_subject(user)?;
        let filter = SubjectFilter::exact(&subject);
        let mut stream = log
            .read_from(
                LogKind::Invocations,
                known.requested_sequence,
                Some(&filter),
            )
            .await?;
        let mut events = Vec::new();
        let mut seen = known.requested_sequence.saturating_sub(1);
        while let Some(recorded) = stream.next().await {
            let recorded = match recorded {
                Ok(recorded) => recorded,
                Err(EventLogError::Corrupt { .. }) => continue,
                Err(error) => return Err(error.into()),
            };
            seen = recorded.sequence;
            if let Some(event) = recorded.envelope.event
                && invocation_id_of(&event) == Some(id.as_str())
            {
                events.push(event);
            }
        }
        Ok((events, seen))
    }

    /// The outcome once it is final (or, unless `through_approval`, awaiting approval), or
    /// as it is after `limit`. Follows the user's subject after `seen` for this invocation's
    /// events.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn await_outcome(
        &self,
        user: &UserId,
        id: &InvocationId,
        seen: u64,
        mut events: Vec<Event>,
        limit: Duration,
        through_approval: bool,
    ) -> Result<InvocationReport, InvokerError> {
        let settled = |report: &InvocationReport| {
            report.outcome.is_final()
                || (report.outcome == Outcome::AwaitingApproval && !through_approval)
        };
        let mut report = self.report(user, id, &events);
        let stopping = &self.inner.stopping;
        if !(settled(&report) || limit.is_zero() || stopping.is_cancelled()) {
            let until = tokio::time::Instant::now() + limit;
            let subject = invocation_subject(user)?;
            let filter = SubjectFilter::exact(&subject);
            let mut stream = self
                .inner
                .log
                .subscribe(LogKind::Invocations, seen + 1, Some(&filter))
                .await?;
            loop {
                let next = tokio::select! {
                    () = stopping.cancelled() => break,
                    next = tokio::time::timeout_at(until, stream.next()) => next,
                };
                match next {
                    Err(_) | Ok(None) => break,
                    Ok(Some(Ok(recorded))) => {
                        if let Some(event) = recorded.envelope.event
                            && invocation_id_of(&event) == Some(id.as_str())
                        {
                            events.push(event);
                            report = self.report(user, id, &events);
                            if settled(&report) {
                                break;
                            }
                        }
                    }
                    Ok(Some(Err(EventLogError::Corrupt { .. }))) => {}
                    Ok(Some(Err(error))) => return Err(error.into()),
                }
            }
        }
        if report.outcome == Outcome::Completed && report.result.is_none() {
            report.result = match self.result_from_holder(user, id, &events).await {
                Some(whole) => Some(whole),
                // The holder gone: what the log captured of it, cut.
                None => events.iter().rev().find_map(|event| match event {
                    Event::InvocationCompleted(e) => captured_result(e),
                    _ => None,
                }),
            };
        }
        Ok(report)
    }

    /// A completed invocation's result that another process holds in memory (it made the
    /// call, and payloads are not captured), fetched from it, or handed over in the vault
    /// when it stopped; `None` when neither has it.
    async fn result_from_holder(
        &self,
        user: &UserId,
        id: &InvocationId,
        events: &[Event],
    ) -> Option<Arc<ResultEnvelope>> {
        let holder = events.iter().rev().find_map(|event| match event {
            Event::InvocationCompleted(completed) => Some(completed.result_held_by.as_str()),
            _ => None,
        })?;
        if holder.is_empty() || holder == self.inner.instance {
            return None;
        }
        let fetched = match self.inner.result_peers.get() {
            Some(peers) => peers.fetch(holder, user, id.as_str()).await,
            None => None,
        };
        // The holder stopped (or this process cannot ask it): what it handed over.
        let fetched = match fetched {
            Some(result) => Some(result),
            None => self.handed_over_result(user, id).await,
        };
        if let Some(result) = &fetched {
            // Kept here too: the next look-up need not ask again.
            let key = domain::projections::invocation_key(user.as_str(), id.as_str());
            self.remember_result(key, result.clone());
        }
        fetched
    }
}
