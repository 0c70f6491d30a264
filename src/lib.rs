//! sigrun takes a prepared VM to verified Azure Batch pools: snapshot → managed image → Compute
//! Gallery image version replicated to regions → Batch pools → verification, as stages that
//! exchange messages over a queue.
//!
//! A tour of the modules:
//! - [`admission`]: from a request to a started run (plan, entry, first messages), the workers'
//!   trigger admitter, `sigrun run`'s local run.
//! - [`azure`]: the Azure operations the pipeline calls (trait, REST client, error classes).
//! - [`bus`]: the message bus interface, its in-process implementation and the RabbitMQ one.
//! - [`events`]: run history events and the run result derived from them.
//! - [`ledger`]: claims and commits in the history stream, so each step of a run happens once
//!   however many copies of its message the bus delivers; which runs started, were cancelled,
//!   are still making their pools.
//! - [`planner`]: spec → plan, reading Azure and applying every preflight rule.
//! - [`runtime`]: consume → step → publish → ack, retries, delays, parking.
//! - [`stages`]: the six stages as state machines over the Azure trait.
//! - [`telemetry`]: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.
//! - [`dlq`]: a parked message read for people, and putting it back (`sigrun dlq`, the web page).
//! - [`input_file`]: reading the files a user points at, regular files only, bounded.
//! - [`config`]: settings: defaults, a file, `SIGRUN__SECTION__KEY` variables.
//! - [`ui`]: the web page for runs and the fleet (`sigrun ui`, `sigrun dev`).
//! - [`cli`]: the command line; the only place that wires everything together.
//! - [`emulator`]: the built-in Azure emulator (AAD, ARM, Compute Gallery, Batch) used by tests and
//!   dry runs; it shares no code with the rest.
//! - [`model`]: resource ids, pipeline specs, the Azure rules, the message envelope, the trigger
//!   (no IO).

pub mod admission;
pub mod azure;
pub mod bus;
pub mod cli;
pub mod config;
pub mod dlq;
pub mod emulator;
pub mod events;
pub mod input_file;
pub mod ledger;
pub mod model;
pub mod planner;
pub mod runtime;
pub mod stages;
pub mod telemetry;
pub mod ui;
