//! The admitter: every `sigrun worker` runs one, whatever its stages. It takes triggers from
//! `{p}.triggers` — a single-active-consumer queue, so one admitter decides at a time while the
//! others stand by — and turns each into a started run, a duplicate, a parked trigger or a trigger
//! put off for later:
//!
//! - a trigger that does not parse (not JSON, oversized, another version, a bad field) is parked
//!   at once with the reason (retrying cannot fix it);
//! - its spec is the trigger's own `spec` text, else the `[pipelines] dir` file whose `name`
//!   matches; none → parked, naming the pipelines there are;
//! - the version is resolved, which names the run: a run the ledger knows has started makes the
//!   trigger a duplicate — acked, recorded as a `DuplicateTrigger` event in the run's history,
//!   nothing published again (a run started meanwhile is caught by the claim below);
//! - it is planned exactly as `sigrun run` and `submit` plan; bad input → `TriggerRejected` in the
//!   run's history and parked; Azure unreadable just now → back on a delay tier with its attempt
//!   count, parked once the retry budget (`[runtime.retry]`) is spent;
//! - admitted through the ledger ([`super::begin`]): the admission is claimed, the first
//!   message(s) published, then one commit records `RunStarted` and makes them live; then the
//!   trigger is acked. Each publish is confirmed; one that is not returns the trigger to its queue.
//!
//! The claim makes the admission happen once per run, however the trigger arrives: a duplicate,
//! a redelivery after the connection dropped mid-admission (the broker hands it to the next
//! admitter while the first may still be planning), two admitters after a partition. The stream
//! orders their claims; the first holds the admission, the others find the run started (a
//! duplicate) or, while the holder may still commit, put their trigger off and look again. A
//! holder that died before its commit is taken over after the claim timeout; what it had sent is
//! not live, so stage workers drop it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::watch;
use tracing::{Instrument, Span, field, info, info_span, warn};
use uuid::Uuid;

use super::{Begun, PrepareError, RunRequest, begin, entry_stage, trunk_event};
use crate::azure::AzureApi;
use crate::bus::{BusError, TriggerDelivery, TriggerMessage, Triggers};
use crate::events::EventKind;
use crate::ledger::Ledger;
use crate::model::envelope::Stage;
use crate::model::spec::PipelineSpec;
use crate::model::trace::TraceParent;
use crate::model::trigger::{self, Trigger, run_id};
use crate::runtime::RetrySettings;
use crate::runtime::retry::{self, Decision};

/// How long a trigger whose admission another admitter holds is put off before it is looked at
/// again.
const PUT_OFF: Duration = Duration::from_secs(1);

/// What became of one trigger.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// The run started: `messages` first message(s) published at `entry`, then `RunStarted`.
    Started {
        run_id: Uuid,
        entry: Stage,
        messages: usize,
    },
    /// The run had started already; nothing was published but a `DuplicateTrigger` event.
    Duplicate { run_id: Uuid },
    /// Parked with the reason (`run_id` when the trigger named a run).
    Parked { run_id: Option<Uuid>, reason: String },
    /// Put off on a delay tier (Azure could not be read): back after `delay`.
    Delayed { attempt: u32, delay: Duration },
    /// A publish was not confirmed: the trigger went back to its queue, to be handled again.
    Requeued { error: String },
}

pub struct Admitter {
    bus: Arc<dyn Triggers>,
    ledger: Arc<Ledger>,
    azure: Arc<dyn AzureApi>,
    pipelines_dir: PathBuf,
    retry: RetrySettings,
}

/// A run the trigger named, for the events written into its history.
struct Named {
    run_id: Uuid,
    pipeline: String,
    version: String,
}

impl Admitter {
    pub fn new(
        bus: Arc<dyn Triggers>,
        ledger: Arc<Ledger>,
        azure: Arc<dyn AzureApi>,
        pipelines_dir: PathBuf,
        retry: RetrySettings,
    ) -> Admitter {
        Admitter {
            bus,
            ledger,
            azure,
            pipelines_dir,
            retry,
        }
    }

    /// Takes triggers until `stop` turns true or the bus shuts down; returns how many it handled.
    /// A trigger being handled when `stop` turns true is finished first.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) -> u64 {
        let mut handled = 0;
        loop {
            let delivery = tokio::select! {
                biased;
                _ = stop.wait_for(|stop| *stop) => return handled,
                delivery = self.bus.next_trigger() => match delivery {
                    Some(delivery) => delivery,
                    None => return handled,
                },
            };
            self.handle(delivery).await;
            handled += 1;
        }
    }

    /// Handles one trigger to the end: acked (started, duplicate, parked, delayed) or requeued.
    pub async fn handle(&self, delivery: TriggerDelivery) -> Admission {
        let TriggerDelivery { message, acker } = delivery;
        // The run's fields are recorded as they become known (pipeline, then run id): from then
        // on every line of the admission carries them, with `stage = "admission"`.
        let span = info_span!(
            "trigger",
            message_id = message.message_id.as_deref().unwrap_or("-"),
            delivery = message.delivery_count,
            run_id = field::Empty,
            pipeline = field::Empty,
            stage = field::Empty,
            trace_id = field::Empty,
            span_id = field::Empty,
        );
        async {
            let admitted = std::panic::AssertUnwindSafe(self.admit(&message)).catch_unwind().await;
            let admitted = match admitted {
                Ok(admitted) => admitted,
                // A bug met by some input: that trigger is parked with the reason, and admission
                // goes on for every other.
                Err(panic) => {
                    let what = crate::model::text::panic_message(&*panic);
                    tracing::error!(panic = %what, "admitting the trigger panicked; parking it");
                    self.park(
                        &message,
                        None,
                        format!("admitting it failed inside sigrun (a bug): {what}"),
                    )
                    .await
                }
            };
            let admission = match admitted {
                Ok(admission) => {
                    if let Err(error) = acker.ack().await {
                        warn!(%error, "ack failed; the trigger will be delivered again");
                    }
                    admission
                }
                Err(error) => {
                    warn!(%error, "a publish was not confirmed; returning the trigger to its queue");
                    if let Err(error) = acker.requeue().await {
                        warn!(%error, "requeue failed; the broker returns the trigger when the channel closes");
                    }
                    Admission::Requeued {
                        error: error.to_string(),
                    }
                }
            };
            match &admission {
                Admission::Started {
                    run_id,
                    entry,
                    messages,
                } => {
                    info!(%run_id, %entry, messages, "run started")
                }
                Admission::Duplicate { run_id } => info!(%run_id, "duplicate trigger: the run has started already"),
                Admission::Parked { run_id, reason } => warn!(run_id = ?run_id, %reason, "trigger parked"),
                Admission::Delayed { attempt, delay } => {
                    warn!(
                        attempt,
                        delay_ms = delay.as_millis(),
                        "trigger put off: Azure could not be read"
                    )
                }
                Admission::Requeued { .. } => {}
            }
            admission
        }
        .instrument(span)
        .await
    }

    /// Decides and publishes; an error means something was not confirmed (requeue, not ack).
    async fn admit(&self, message: &TriggerMessage) -> Result<Admission, BusError> {
        let received = match trigger::parse(&message.body, message.content_type.as_deref()) {
            Ok(received) => received,
            Err(error) => return self.park(message, None, error.to_string()).await,
        };
        let trigger = received.trigger;
        // The producer's trace (AMQP header first, then the CloudEvents extension), else a new
        // one; the admission is its next span, the parent of the run's first messages.
        let producer = message.traceparent.as_deref().or(received
            .cloud_event
            .as_ref()
            .and_then(|event| event.traceparent.as_deref()));
        let trace = match producer.map(|text| (text, TraceParent::parse(text))) {
            Some((_, Some(parent))) => parent.hop(),
            Some((text, None)) => {
                info!(traceparent = %text, "the trigger's traceparent is not W3C trace context; starting a new trace");
                TraceParent::new()
            }
            None => TraceParent::new(),
        };
        let span = Span::current();
        span.record("trace_id", trace.trace_id());
        span.record("span_id", trace.span_id());
        let trigger_id = message
            .message_id
            .clone()
            .or_else(|| received.cloud_event.map(|event| event.id));
        let (spec, origin) = match self.spec_of(&trigger).await {
            Ok(found) => found,
            Err(reason) => return self.park(message, None, reason).await,
        };
        span.record("pipeline", spec.name.as_str());
        span.record("stage", "admission");
        let request = RunRequest {
            version: trigger.version.clone(),
            image_version_id: trigger.image_version_id.clone(),
            image_id: None,
        };
        let azure = self.azure.as_ref();
        let inputs = match super::resolve(&spec, &origin, &request, azure).await {
            Ok(inputs) => inputs,
            Err(error) => {
                // Without a resolved version the run is named only if the trigger gave one.
                let named = trigger.version.as_ref().map(|version| Named {
                    run_id: run_id(&spec.name, version),
                    pipeline: spec.name.clone(),
                    version: version.clone(),
                });
                return self.refuse(message, named.as_ref(), &trigger, error).await;
            }
        };
        let named = Named {
            run_id: run_id(&spec.name, &inputs.version),
            pipeline: spec.name.clone(),
            version: inputs.version.clone(),
        };
        span.record("run_id", field::display(named.run_id));
        // Known started already: no need to plan (the claim below decides exactly otherwise).
        if self.ledger.started(named.run_id).is_some() {
            return self.duplicate(&named, trigger_id).await;
        }
        let prepared = match super::plan(spec, &origin, inputs, azure).await {
            Ok(prepared) => prepared,
            Err(error) => return self.refuse(message, Some(&named), &trigger, error).await,
        };
        for warning in &prepared.plan.warnings {
            info!(run_id = %named.run_id, %warning, "plan warning");
        }
        let entry = match entry_stage(trigger.from, &prepared) {
            Ok(entry) => entry,
            Err(error) => return self.reject(message, Some(&named), &trigger, error.to_string()).await,
        };
        match begin(self.bus.as_ref(), &self.ledger, &prepared, entry, &trace).await? {
            Begun::Started { messages } => Ok(Admission::Started {
                run_id: named.run_id,
                entry,
                messages,
            }),
            Begun::AlreadyStarted => self.duplicate(&named, trigger_id).await,
            Begun::Held => {
                // Another admitter holds this run's admission and may still commit it.
                self.bus.delay_trigger(message, PUT_OFF, message.attempts).await?;
                Ok(Admission::Delayed {
                    attempt: message.attempts,
                    delay: PUT_OFF,
                })
            }
        }
    }

    /// A trigger for a run that has started: recorded in its history, nothing started again.
    async fn duplicate(&self, named: &Named, trigger_id: Option<String>) -> Result<Admission, BusError> {
        let entry = self.ledger.started(named.run_id).unwrap_or(Stage::Snapshot);
        let event = trunk_event(
            named.run_id,
            &named.pipeline,
            &named.version,
            entry,
            EventKind::DuplicateTrigger { message_id: trigger_id },
        );
        self.bus.publish_event(&event).await?;
        Ok(Admission::Duplicate { run_id: named.run_id })
    }

    /// The trigger's spec and a name for it in errors: its own text, else the pipelines directory.
    async fn spec_of(&self, trigger: &Trigger) -> Result<(PipelineSpec, String), String> {
        if let Some(text) = &trigger.spec {
            let origin = format!("the spec in the trigger for `{}`", trigger.pipeline);
            let spec = PipelineSpec::parse(text, &origin).map_err(|e| e.to_string())?;
            if spec.name != trigger.pipeline {
                return Err(format!(
                    "the trigger names pipeline `{}` but its spec is named `{}`",
                    trigger.pipeline, spec.name
                ));
            }
            return Ok((spec, origin));
        }
        let dir = self.pipelines_dir.clone();
        let name = trigger.pipeline.clone();
        let found = tokio::task::spawn_blocking(move || super::pipelines::find(&dir, &name))
            .await
            .map_err(|e| format!("looking for the pipeline: {e}"))?
            .map_err(|e| e.to_string())?;
        Ok((found.spec, found.path.display().to_string()))
    }

    /// A preparation that failed: bad input is rejected; Azure unreadable just now puts the
    /// trigger off on a delay tier, until the retry budget is spent.
    async fn refuse(
        &self,
        message: &TriggerMessage,
        named: Option<&Named>,
        trigger: &Trigger,
        error: PrepareError,
    ) -> Result<Admission, BusError> {
        match error {
            PrepareError::Invalid(reason) => self.reject(message, named, trigger, reason).await,
            PrepareError::Transient { origin, error } => match retry::decide(&self.retry, message.attempts, &error) {
                Decision::Retry { attempt, delay, .. } => {
                    self.bus.delay_trigger(message, delay, attempt).await?;
                    Ok(Admission::Delayed { attempt, delay })
                }
                Decision::Fail { reason, .. } => {
                    self.reject(message, named, trigger, format!("{origin}: {reason}"))
                        .await
                }
            },
        }
    }

    /// Refuses a trigger for good: its run's history hears why (when the trigger named a run),
    /// then the trigger is parked with the same reason.
    async fn reject(
        &self,
        message: &TriggerMessage,
        named: Option<&Named>,
        trigger: &Trigger,
        reason: String,
    ) -> Result<Admission, BusError> {
        let reason = crate::model::text::bounded(&reason);
        if let Some(named) = named {
            let event = trunk_event(
                named.run_id,
                &named.pipeline,
                &named.version,
                trigger.from.unwrap_or(Stage::Snapshot),
                EventKind::TriggerRejected { reason: reason.clone() },
            );
            self.bus.publish_event(&event).await?;
        }
        self.park(message, named.map(|n| n.run_id), reason).await
    }

    async fn park(
        &self,
        message: &TriggerMessage,
        run_id: Option<Uuid>,
        reason: String,
    ) -> Result<Admission, BusError> {
        let reason = crate::model::text::bounded(&reason);
        self.bus.park_trigger(message, &reason).await?;
        Ok(Admission::Parked { run_id, reason })
    }
}
