//! A Batch request body read as Batch reads it. Batch's OData reader converts a JSON string
//! literal to the primitive type its property declares, so an int32 property given as `"2"` is
//! 2 and a boolean given as `"false"` is false: the Azure CLI 2.91 sends such strings (`az batch
//! pool create --target-dedicated-nodes 2` gives `"targetDedicatedNodes": "2"`, as azure-batch 15
//! serializes arguments as given). Anything else in such a property — a fraction, words, an
//! exponent, a number past 32 bits, `"yes"` — is refused with `InvalidPropertyValue` naming the
//! property and the value. A body is never read as something other than what was sent, and what is
//! stored (and shown by GET) is the typed value.

use serde_json::{Map, Value};

use super::error;
use crate::emulator::http::{Request, Response};

/// The primitive types Batch converts a string to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Primitive {
    Int32,
    Boolean,
}

/// A typed property: its path of keys, dotted (an array met on the way applies the rest of the
/// path to each of its elements), and its type.
pub type Typed = (&'static str, Primitive);

use Primitive::{Boolean, Int32};

/// The int32 and boolean properties of a pool, from the Batch spec's `PoolAddParameter` (its
/// `PoolPatchParameter` declares a subset of them).
pub const POOL: &[Typed] = &[
    ("targetDedicatedNodes", Int32),
    ("targetLowPriorityNodes", Int32),
    ("taskSlotsPerNode", Int32),
    ("enableAutoScale", Boolean),
    ("enableInterNodeCommunication", Boolean),
    ("startTask.maxTaskRetryCount", Int32),
    ("startTask.waitForSuccess", Boolean),
    (
        "startTask.containerSettings.containerHostBatchBindMounts.isReadOnly",
        Boolean,
    ),
    ("virtualMachineConfiguration.osDisk.diskSizeGB", Int32),
    ("virtualMachineConfiguration.osDisk.writeAcceleratorEnabled", Boolean),
    ("virtualMachineConfiguration.dataDisks.lun", Int32),
    ("virtualMachineConfiguration.dataDisks.diskSizeGB", Int32),
    (
        "virtualMachineConfiguration.windowsConfiguration.enableAutomaticUpdates",
        Boolean,
    ),
    (
        "virtualMachineConfiguration.extensions.autoUpgradeMinorVersion",
        Boolean,
    ),
    ("virtualMachineConfiguration.extensions.enableAutomaticUpgrade", Boolean),
    ("virtualMachineConfiguration.securityProfile.encryptionAtHost", Boolean),
    (
        "virtualMachineConfiguration.securityProfile.uefiSettings.secureBootEnabled",
        Boolean,
    ),
    (
        "virtualMachineConfiguration.securityProfile.uefiSettings.vTpmEnabled",
        Boolean,
    ),
    ("networkConfiguration.enableAcceleratedNetworking", Boolean),
    (
        "networkConfiguration.endpointConfiguration.inboundNATPools.backendPort",
        Int32,
    ),
    (
        "networkConfiguration.endpointConfiguration.inboundNATPools.frontendPortRangeStart",
        Int32,
    ),
    (
        "networkConfiguration.endpointConfiguration.inboundNATPools.frontendPortRangeEnd",
        Int32,
    ),
    (
        "networkConfiguration.endpointConfiguration.inboundNATPools.networkSecurityGroupRules.priority",
        Int32,
    ),
    ("userAccounts.linuxUserConfiguration.uid", Int32),
    ("userAccounts.linuxUserConfiguration.gid", Int32),
    (
        "upgradePolicy.automaticOSUpgradePolicy.disableAutomaticRollback",
        Boolean,
    ),
    (
        "upgradePolicy.automaticOSUpgradePolicy.enableAutomaticOSUpgrade",
        Boolean,
    ),
    (
        "upgradePolicy.automaticOSUpgradePolicy.useRollingUpgradePolicy",
        Boolean,
    ),
    (
        "upgradePolicy.automaticOSUpgradePolicy.osRollingUpgradeDeferral",
        Boolean,
    ),
    ("upgradePolicy.rollingUpgradePolicy.enableCrossZoneUpgrade", Boolean),
    (
        "upgradePolicy.rollingUpgradePolicy.prioritizeUnhealthyInstances",
        Boolean,
    ),
    (
        "upgradePolicy.rollingUpgradePolicy.rollbackFailedInstancesOnPolicyBreach",
        Boolean,
    ),
    ("upgradePolicy.rollingUpgradePolicy.maxBatchInstancePercent", Int32),
    ("upgradePolicy.rollingUpgradePolicy.maxUnhealthyInstancePercent", Int32),
    (
        "upgradePolicy.rollingUpgradePolicy.maxUnhealthyUpgradedInstancePercent",
        Int32,
    ),
];

/// The typed properties of `PoolResizeParameter`.
pub const RESIZE: &[Typed] = &[("targetDedicatedNodes", Int32), ("targetLowPriorityNodes", Int32)];

/// Most of a refused value shown back in an error (a body may be megabytes).
const SHOWN_VALUE_CHARS: usize = 64;

/// The JSON object of `req`'s body with its typed properties read as their types, or the answer
/// refusing it.
pub fn read(req: &Request, typed: &[Typed]) -> Result<Map<String, Value>, Response> {
    let mut body = match serde_json::from_slice(&req.body) {
        Ok(Value::Object(map)) => map,
        _ => {
            return Err(error(
                req,
                400,
                "InvalidRequestBody",
                "The specified Request Body is not syntactically valid.",
                &[],
            ));
        }
    };
    for &(path, kind) in typed {
        let keys: Vec<&str> = path.split('.').collect();
        if let Err(bad) = read_in(&mut body, &keys, kind) {
            let reason = match kind {
                Int32 => "The value is not a whole number that fits in 32 bits.",
                Boolean => "The value is not true or false.",
            };
            return Err(error(
                req,
                400,
                "InvalidPropertyValue",
                "The value provided for one of the properties in the request body is invalid.",
                &[
                    ("PropertyName", &bad.property),
                    ("PropertyValue", &bad.value),
                    ("Reason", reason),
                ],
            ));
        }
    }
    Ok(body)
}

/// A typed property holding something else.
#[derive(Debug, PartialEq, Eq)]
pub struct BadValue {
    pub property: String,
    /// The value as sent (JSON text), cut short.
    pub value: String,
}

/// Reads every value at `path` under `node` as `kind`, in place.
fn read_at(node: &mut Value, path: &[&str], kind: Primitive) -> Result<(), BadValue> {
    match node {
        Value::Array(items) => items.iter_mut().try_for_each(|item| read_at(item, path, kind)),
        Value::Object(map) => read_in(map, path, kind),
        _ => Ok(()),
    }
}

fn read_in(map: &mut Map<String, Value>, path: &[&str], kind: Primitive) -> Result<(), BadValue> {
    let Some((key, rest)) = path.split_first() else {
        return Ok(());
    };
    let Some(child) = map.get_mut(*key) else {
        return Ok(());
    };
    if !rest.is_empty() {
        return read_at(child, rest, kind);
    }
    if child.is_null() {
        return Ok(());
    }
    let read = match kind {
        Int32 => int32(child).map(Value::from),
        Boolean => boolean(child).map(Value::from),
    };
    match read {
        Some(value) => {
            *child = value;
            Ok(())
        }
        None => Err(BadValue {
            property: (*key).to_string(),
            value: child.to_string().chars().take(SHOWN_VALUE_CHARS).collect(),
        }),
    }
}

/// An int32 as Batch reads one: a JSON integer in range, or a string holding one as .NET parses
/// an integer (spaces around it, an optional sign, decimal digits).
fn int32(value: &Value) -> Option<i32> {
    match value {
        Value::Number(n) => n.as_i64().and_then(|n| i32::try_from(n).ok()),
        Value::String(s) => {
            let s = s.trim();
            let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.strip_prefix('+').unwrap_or(s).parse().ok()
        }
        _ => None,
    }
}

/// A boolean as Batch reads one: `true`/`false`, or a string holding either in any case (as .NET's
/// `Boolean.Parse`, spaces around it allowed).
fn boolean(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.trim().eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.trim().eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn read_all(body: &mut Value, typed: &[Typed]) -> Result<(), BadValue> {
        typed.iter().try_for_each(|&(path, kind)| {
            let keys: Vec<&str> = path.split('.').collect();
            read_at(body, &keys, kind)
        })
    }

    #[test]
    fn a_string_holding_a_whole_number_is_that_number() {
        for (sent, read) in [
            ("2", 2),
            (" 2 ", 2),
            ("+2", 2),
            ("-1", -1),
            ("0", 0),
            ("2147483647", i32::MAX),
        ] {
            assert_eq!(int32(&json!(sent)), Some(read), "{sent:?}");
        }
        assert_eq!(int32(&json!(7)), Some(7));
    }

    #[test]
    fn anything_else_is_not_an_int32() {
        for sent in [
            json!("two"),
            json!("2.5"),
            json!(""),
            json!("1e2"),
            json!("0x10"),
            json!("2147483648"),
            json!("--2"),
            json!("+-2"),
            json!(2.5),
            json!(2.0),
            json!(4_294_967_296_i64),
            json!(true),
            json!([2]),
            json!({"n": 2}),
        ] {
            assert_eq!(int32(&sent), None, "{sent}");
        }
    }

    #[test]
    fn booleans_are_true_or_false_in_any_case_and_nothing_else() {
        for (sent, read) in [(json!(true), true), (json!("False"), false), (json!(" TRUE "), true)] {
            assert_eq!(boolean(&sent), Some(read), "{sent}");
        }
        for sent in [json!("yes"), json!(1), json!("1"), json!(""), json!(["true"])] {
            assert_eq!(boolean(&sent), None, "{sent}");
        }
    }

    #[test]
    fn paths_reach_into_arrays_and_leave_absent_properties_alone() {
        let mut body = json!({
            "targetDedicatedNodes": "2",
            "startTask": {"waitForSuccess": "false"},
            "virtualMachineConfiguration": {"dataDisks": [{"lun": "0", "diskSizeGB": 64}, {"lun": 1}]},
        });
        read_all(&mut body, POOL).unwrap();
        assert_eq!(
            body,
            json!({
                "targetDedicatedNodes": 2,
                "startTask": {"waitForSuccess": false},
                "virtualMachineConfiguration": {"dataDisks": [{"lun": 0, "diskSizeGB": 64}, {"lun": 1}]},
            })
        );
    }

    #[test]
    fn a_bad_value_is_named_with_its_property() {
        let mut body = json!({"virtualMachineConfiguration": {"dataDisks": [{"lun": 0}, {"lun": "one"}]}});
        let bad = read_all(&mut body, POOL).unwrap_err();
        assert_eq!(
            bad,
            BadValue {
                property: "lun".into(),
                value: "\"one\"".into()
            }
        );
    }

    #[test]
    fn every_path_names_a_property_of_its_parameter() {
        for &(path, _) in POOL.iter().chain(RESIZE) {
            assert!(!path.is_empty() && path.split('.').all(|k| !k.is_empty()), "{path:?}");
        }
    }

    proptest! {
        #[test]
        fn every_i32_written_as_text_reads_back(n in any::<i32>(), pad in "[ \t]{0,2}") {
            let text = format!("{pad}{n}{pad}");
            prop_assert_eq!(int32(&json!(text)), Some(n));
        }

        #[test]
        fn any_string_reads_as_the_number_rust_parses_or_not_at_all(s in "\\PC{0,12}") {
            let trimmed = s.trim();
            let expected = trimmed
                .strip_prefix('+')
                .unwrap_or(trimmed)
                .parse::<i32>()
                .ok()
                .filter(|_| !trimmed.starts_with("+-") && !trimmed.starts_with("++"));
            prop_assert_eq!(int32(&json!(s)), expected);
        }

        #[test]
        fn any_node_count_is_read_or_refused_and_never_changed_into_another(
            value in prop_oneof![
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                "\\PC{0,12}".prop_map(Value::from),
                any::<bool>().prop_map(Value::from),
            ]
        ) {
            let mut body = json!({"targetDedicatedNodes": value.clone()});
            match read_all(&mut body, RESIZE) {
                Ok(()) => {
                    let read = body["targetDedicatedNodes"].as_i64().expect("read as a number");
                    let sent = value.as_i64().or_else(|| value.as_str().and_then(|s| s.trim().trim_start_matches('+').parse().ok()));
                    prop_assert_eq!(Some(read), sent);
                }
                Err(bad) => prop_assert_eq!(bad.property, "targetDedicatedNodes"),
            }
        }
    }
}
