//! Integration tests: one binary, one module per area. Everything talks to real servers over real
//! sockets: the emulator (in-process, on an ephemeral port, over TLS) and, where a test needs it,
//! the `sigrun` binary itself.

mod helpers;
// Shared with the worker-process binaries (`tests/support/`): one copy for all.
#[path = "../support/broker.rs"]
mod broker;
#[path = "../support/process.rs"]
mod process;

mod azure_client;
mod cli;
mod dlq;
mod emulator_auth;
mod emulator_budget;
mod emulator_faults;
mod emulator_lro;
mod emulator_rules;
mod pipeline;
mod planner;
mod spec_examples;
mod stages;
mod ui;
mod workers;
