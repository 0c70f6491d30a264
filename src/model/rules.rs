//! The Azure documentation's rules for gallery images in Batch pools, as pure functions. Each rule
//! is here once, so one grep finds it; the planner and the stages call these, never restate them.

use std::time::Duration;

/// Nodes one gallery replica serves. The Batch document says 600 (later guidance says 300, so the
/// pipeline takes it as a setting with this default).
pub const DEFAULT_NODES_PER_REPLICA: u32 = 600;

/// Minimum replicas a region needs for the pools planned there: one per `nodes_per_replica` nodes,
/// at least one (3000 nodes at 600 per replica: 5).
pub fn replicas_needed(nodes_in_region: u32, nodes_per_replica: u32) -> u32 {
    nodes_in_region.div_ceil(nodes_per_replica.max(1)).max(1)
}

/// Gallery replica counts Azure accepts per region.
pub const MAX_REPLICAS: u32 = 100;

/// Batch's floor and default for `resizeTimeout`.
pub const MIN_RESIZE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_RESIZE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Minimum `resizeTimeout` for a fixed-size pool: 15 minutes per 1000 nodes (2000 nodes: 30
/// minutes), never below Batch's default of 15 minutes.
pub fn min_resize_timeout(nodes: u32) -> Duration {
    let per_node_secs = 15.0 * 60.0 / 1000.0;
    let scaled = Duration::from_secs_f64((nodes as f64 * per_node_secs).ceil());
    scaled.max(DEFAULT_RESIZE_TIMEOUT)
}

/// Batch only builds pools from generalized images.
pub fn generalized(os_state: &str) -> bool {
    os_state.eq_ignore_ascii_case("Generalized")
}

/// Why an existing image definition cannot take this pipeline's images: Batch builds pools only
/// from Generalized images, and a definition holds images of one OS. Read as "… is Specialized;
/// Batch pools need a Generalized image".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionMismatch {
    #[error("is {0}; Batch pools need a Generalized image")]
    NotGeneralized(String),
    #[error("has osType {found}, the spec says {wanted}")]
    OtherOs { found: String, wanted: String },
}

impl DefinitionMismatch {
    /// The spec key the mismatch is about.
    pub fn key(&self) -> &'static str {
        match self {
            DefinitionMismatch::NotGeneralized(_) => "definition",
            DefinitionMismatch::OtherOs { .. } => "definition.os_type",
        }
    }
}

/// Whether a definition of `os_state` and `os_type` takes the images of a pipeline building `wanted_os`.
pub fn definition_fits(os_state: &str, os_type: &str, wanted_os: &str) -> Result<(), DefinitionMismatch> {
    if !generalized(os_state) {
        return Err(DefinitionMismatch::NotGeneralized(os_state.to_string()));
    }
    if !os_type.eq_ignore_ascii_case(wanted_os) {
        return Err(DefinitionMismatch::OtherOs {
            found: os_type.to_string(),
            wanted: wanted_os.to_string(),
        });
    }
    Ok(())
}

/// The node agent SKU must match the image's OS: Batch lists each SKU with its `osType`.
pub fn sku_matches_os(sku_os_type: &str, image_os_type: &str) -> bool {
    sku_os_type.eq_ignore_ascii_case(image_os_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_follow_the_600_node_rule() {
        assert_eq!(replicas_needed(0, 600), 1);
        assert_eq!(replicas_needed(600, 600), 1);
        assert_eq!(replicas_needed(601, 600), 2);
        assert_eq!(replicas_needed(3000, 600), 5);
        assert_eq!(replicas_needed(3000, 300), 10);
    }

    #[test]
    fn resize_timeout_follows_the_1000_node_rule() {
        assert_eq!(min_resize_timeout(10), Duration::from_secs(15 * 60));
        assert_eq!(min_resize_timeout(2000), Duration::from_secs(30 * 60));
        assert_eq!(min_resize_timeout(2500), Duration::from_secs(2250));
    }

    #[test]
    fn os_rules() {
        assert!(generalized("generalized"));
        assert!(!generalized("Specialized"));
        assert!(sku_matches_os("linux", "Linux"));
        assert!(!sku_matches_os("windows", "Linux"));
    }
}

/// A gallery image version, `Major.Minor.Patch` with integer parts (Azure's format), ordered as
/// numbers: `2026.1202.0` comes after `2026.1130.9`, `1.10.0` after `1.9.0`. Which of two runs'
/// pools is the older is decided by this order, never by when the pools were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImageVersion(u64, u64, u64);

impl ImageVersion {
    /// `None` for anything that is not three integers separated by dots.
    pub fn parse(text: &str) -> Option<ImageVersion> {
        let mut parts = text.split('.').map(|part| {
            (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                .then(|| part.parse::<u64>().ok())
                .flatten()
        });
        let version = ImageVersion(parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(version)
    }
}

#[cfg(test)]
mod version_tests {
    use super::ImageVersion;

    #[test]
    fn versions_order_as_numbers_and_anything_else_is_not_a_version() {
        let v = |t| ImageVersion::parse(t).unwrap();
        assert!(v("2026.1202.0") > v("2026.1130.9"));
        assert!(v("1.10.0") > v("1.9.0"));
        assert!(v("2026.1202.10") > v("2026.1202.9"));
        assert_eq!(v("01.2.3"), v("1.2.3"));
        for bad in [
            "",
            "1.2",
            "1.2.3.4",
            "1.2.x",
            "1..3",
            "-1.2.3",
            "1.2.3 ",
            "99999999999999999999.0.0",
        ] {
            assert_eq!(ImageVersion::parse(bad), None, "{bad:?}");
        }
    }
}
