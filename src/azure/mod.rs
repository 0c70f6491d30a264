//! Azure access. `api` is the trait the stages and the planner call and its domain types; `error`
//! classifies failures. The REST client behind the trait is the only code that knows reqwest and
//! azure_identity.

pub mod api;
pub mod error;

pub use api::AzureApi;
pub use error::{AzureError, ErrorClass};
