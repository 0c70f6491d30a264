//! sigrun takes a prepared VM to verified Azure Batch pools: snapshot → managed image → Compute
//! Gallery image version replicated to regions → Batch pools → verification, as stages that
//! exchange messages over a queue.
//!
//! A tour of the modules:
//! - [`cli`]: the command line; the only place that wires everything together.
//! - [`emulator`]: the built-in Azure emulator (AAD, ARM, Compute Gallery, Batch) used by tests and
//!   dry runs; it shares no code with the rest.

pub mod cli;
pub mod emulator;
