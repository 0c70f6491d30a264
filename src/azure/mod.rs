//! Azure access. `api` is the trait the stages and the planner call and its domain types; `error`
//! classifies failures. The REST client behind the trait is the only code that knows reqwest and
//! azure_identity: `client::AzureClient`, configured by `config::AzureSettings`, built from `auth`
//! (the credential), `http` (tokens, errors, retries) and the `arm` and `batch` operations;
//! `metrics` counts its requests when given a registry; `writes` tells the runtime whether a step
//! sent anything that may change Azure.

pub mod api;
mod arm;
mod auth;
mod batch;
mod catalog;
pub mod client;
pub mod config;
pub mod error;
mod http;
pub mod pacing;
mod throttles;
pub use http::{MAX_RETRY_AFTER, hand_back_retry_after};
pub mod metrics;
pub mod states;
pub mod writes;

pub use api::AzureApi;
pub use client::AzureClient;
pub use config::{ApiVersions, AzureSettings, CloudSettings, CredentialSettings, RetrySettings, Secret, SettingsError};
pub use error::{AzureError, ErrorClass};
pub use metrics::AzureMetrics;
pub use states::{AllocationState, PoolState, ProvisioningState, RegistrationState, ReplicationState};
