//! The in-process bus (placeholder until the memory bus lands).
