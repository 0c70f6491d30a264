//! The pipeline's data: typed and validated Azure resource ids, pipeline specs, the Azure rules as
//! pure functions, the message envelope that carries a run between stages, the trigger that asks
//! for a run and the W3C trace context that follows it, and `text`: how input-derived text is
//! bounded and made safe before it goes back out. No IO here.

pub mod envelope;
pub mod ids;
pub mod plan;
pub mod rules;
pub mod spec;
pub mod text;
pub mod trace;
pub mod trigger;
