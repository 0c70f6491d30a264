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
