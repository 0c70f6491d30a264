//! The VM sizes Batch offers in every emulated region, as Batch management's
//! `locations/{location}/virtualMachineSkus` lists them: the name, the quota family the size's cores
//! count against, and its capabilities (`vCPUs`, `MemoryGB`, `LowPriorityCapable`). A pool of any
//! other size is refused, as Batch refuses it (the legacy `small`…`extralarge` aside).

use serde_json::{Value, json};

/// One size: name, family, vCPUs, memory in GB.
struct VmSize {
    name: &'static str,
    family: &'static str,
    vcpus: u32,
    memory_gb: &'static str,
}

const fn size(name: &'static str, family: &'static str, vcpus: u32, memory_gb: &'static str) -> VmSize {
    VmSize {
        name,
        family,
        vcpus,
        memory_gb,
    }
}

const SIZES: &[VmSize] = &[
    size("Standard_A1", "standardA0_A7Family", 1, "1.75"),
    size("Standard_A1_v2", "standardAv2Family", 1, "2"),
    size("Standard_A2_v2", "standardAv2Family", 2, "4"),
    size("Standard_A4_v2", "standardAv2Family", 4, "8"),
    size("Standard_D2_v3", "standardDv3Family", 2, "8"),
    size("Standard_D4_v3", "standardDv3Family", 4, "16"),
    size("Standard_D8_v3", "standardDv3Family", 8, "32"),
    size("Standard_D2s_v3", "standardDSv3Family", 2, "8"),
    size("Standard_D4s_v3", "standardDSv3Family", 4, "16"),
    size("Standard_D8s_v3", "standardDSv3Family", 8, "32"),
    size("Standard_D16s_v3", "standardDSv3Family", 16, "64"),
    size("Standard_DS1_v2", "standardDSv2Family", 1, "3.5"),
    size("Standard_DS2_v2", "standardDSv2Family", 2, "7"),
    size("Standard_DS3_v2", "standardDSv2Family", 4, "14"),
    size("Standard_DS4_v2", "standardDSv2Family", 8, "28"),
    size("Standard_D2_v5", "standardDv5Family", 2, "8"),
    size("Standard_D4_v5", "standardDv5Family", 4, "16"),
    size("Standard_D2s_v5", "standardDSv5Family", 2, "8"),
    size("Standard_D4s_v5", "standardDSv5Family", 4, "16"),
    size("Standard_D8s_v5", "standardDSv5Family", 8, "32"),
    size("Standard_D16s_v5", "standardDSv5Family", 16, "64"),
    size("Standard_D32s_v5", "standardDSv5Family", 32, "128"),
    size("Standard_D64s_v5", "standardDSv5Family", 64, "256"),
    size("Standard_D2ds_v5", "standardDDSv5Family", 2, "8"),
    size("Standard_D4ds_v5", "standardDDSv5Family", 4, "16"),
    size("Standard_E2s_v5", "standardESv5Family", 2, "16"),
    size("Standard_E4s_v5", "standardESv5Family", 4, "32"),
    size("Standard_E8s_v5", "standardESv5Family", 8, "64"),
    size("Standard_E16s_v5", "standardESv5Family", 16, "128"),
    size("Standard_F2s_v2", "standardFSv2Family", 2, "4"),
    size("Standard_F4s_v2", "standardFSv2Family", 4, "8"),
    size("Standard_F8s_v2", "standardFSv2Family", 8, "16"),
    size("Standard_F16s_v2", "standardFSv2Family", 16, "32"),
    size("Standard_F32s_v2", "standardFSv2Family", 32, "64"),
    size("Standard_NC6s_v3", "standardNCSv3Family", 6, "112"),
    size("Standard_NC24ads_A100_v4", "StandardNCADSA100v4Family", 24, "220"),
    size("Standard_HB120rs_v3", "standardHBrsv3Family", 120, "448"),
    size("Standard_HC44rs", "standardHCSFamily", 44, "352"),
    size("Standard_L8s_v3", "standardLSv3Family", 8, "64"),
];

/// The Cloud Services names of the A-series sizes, which Batch's own pool examples still use.
const LEGACY_NAMES: [&str; 5] = ["extrasmall", "small", "medium", "large", "extralarge"];

/// Whether Batch takes `name` for a pool (compared without case, as Batch does).
pub fn offered(name: &str) -> bool {
    SIZES.iter().any(|s| s.name.eq_ignore_ascii_case(name)) || LEGACY_NAMES.iter().any(|l| l.eq_ignore_ascii_case(name))
}

/// A size's quota family and vCPUs (`None` for the legacy names and unknown sizes).
pub fn cores(name: &str) -> Option<(&'static str, u32)> {
    SIZES
        .iter()
        .find(|s| s.name.eq_ignore_ascii_case(name))
        .map(|s| (s.family, s.vcpus))
}

/// Every size, rendered as a `SupportedSku` of the Batch management API.
pub fn rendered() -> Vec<Value> {
    SIZES
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "familyName": s.family,
                "capabilities": [
                    {"name": "vCPUs", "value": s.vcpus.to_string()},
                    {"name": "MemoryGB", "value": s.memory_gb},
                    {"name": "LowPriorityCapable", "value": "True"},
                    {"name": "vCPUsAvailable", "value": s.vcpus.to_string()},
                ],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_found_without_case_and_listed_with_their_cores() {
        assert!(offered("standard_d4s_v5"));
        assert!(!offered("Standard_Floppy"));
        let listed = rendered();
        let d4 = listed.iter().find(|s| s["name"] == "Standard_D4s_v5").unwrap();
        assert_eq!(d4["familyName"], "standardDSv5Family");
        assert_eq!(d4["capabilities"][0], json!({"name": "vCPUs", "value": "4"}));
        let names: std::collections::HashSet<_> = SIZES.iter().map(|s| s.name.to_ascii_lowercase()).collect();
        assert_eq!(names.len(), SIZES.len(), "no size listed twice");
    }
}
