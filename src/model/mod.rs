//! The pipeline's data: typed and validated Azure resource ids, pipeline specs, the Azure rules as
//! pure functions, and the message envelope that carries a run between stages. No IO here.

pub mod envelope;
pub mod ids;
pub mod plan;
pub mod rules;
pub mod spec;
