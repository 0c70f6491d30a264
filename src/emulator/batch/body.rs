//! A Batch request body read as Batch reads it. Batch's OData reader converts a JSON string
//! literal to the primitive type its property declares, so an int32 property given as `"2"` is
//! 2: that is what the Azure CLI 2.91 sends (`az batch pool create --target-dedicated-nodes 2`
//! gives `"targetDedicatedNodes": "2"`, as azure-batch 15 serializes arguments as given). Anything
//! else in an int32 property — a fraction, words, an exponent, a number past 32 bits, `true` — is
//! refused with `InvalidPropertyValue` naming the property and the value. A body is never read as
//! something other than what was sent, and what is stored (and shown by GET) is the number.

use serde_json::{Map, Value};

use super::error;
use crate::emulator::http::{Request, Response};

/// A path of keys to an int32 property; an array met on the way applies the rest of the path to
/// each of its elements.
pub type Int32Path = &'static [&'static str];

/// The int32 properties of a pool, from the Batch spec's `PoolAddParameter` (its
/// `PoolPatchParameter` declares a subset of them).
pub const POOL: &[Int32Path] = &[
    &["targetDedicatedNodes"],
    &["targetLowPriorityNodes"],
    &["taskSlotsPerNode"],
    &["startTask", "maxTaskRetryCount"],
    &["virtualMachineConfiguration", "osDisk", "diskSizeGB"],
    &["virtualMachineConfiguration", "dataDisks", "lun"],
    &["virtualMachineConfiguration", "dataDisks", "diskSizeGB"],
    &[
        "networkConfiguration",
        "endpointConfiguration",
        "inboundNATPools",
        "backendPort",
    ],
    &[
        "networkConfiguration",
        "endpointConfiguration",
        "inboundNATPools",
        "frontendPortRangeStart",
    ],
    &[
        "networkConfiguration",
        "endpointConfiguration",
        "inboundNATPools",
        "frontendPortRangeEnd",
    ],
    &[
        "networkConfiguration",
        "endpointConfiguration",
        "inboundNATPools",
        "networkSecurityGroupRules",
        "priority",
    ],
    &["userAccounts", "linuxUserConfiguration", "uid"],
    &["userAccounts", "linuxUserConfiguration", "gid"],
    &["upgradePolicy", "rollingUpgradePolicy", "maxBatchInstancePercent"],
    &["upgradePolicy", "rollingUpgradePolicy", "maxUnhealthyInstancePercent"],
    &[
        "upgradePolicy",
        "rollingUpgradePolicy",
        "maxUnhealthyUpgradedInstancePercent",
    ],
];

/// The int32 properties of `PoolResizeParameter`.
pub const RESIZE: &[Int32Path] = &[&["targetDedicatedNodes"], &["targetLowPriorityNodes"]];

/// Most of a refused value shown back in an error (a body may be megabytes).
const SHOWN_VALUE_CHARS: usize = 64;

/// The JSON object of `req`'s body with its int32 properties (`paths`) read as numbers, or the
/// answer refusing it.
pub fn read(req: &Request, paths: &[Int32Path]) -> Result<Map<String, Value>, Response> {
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
    for path in paths {
        if let Err(bad) = read_int32_in(&mut body, path) {
            return Err(error(
                req,
                400,
                "InvalidPropertyValue",
                "The value provided for one of the properties in the request body is invalid.",
                &[
                    ("PropertyName", &bad.property),
                    ("PropertyValue", &bad.value),
                    ("Reason", "The value is not a whole number that fits in 32 bits."),
                ],
            ));
        }
    }
    Ok(body)
}

/// An int32 property holding something else.
#[derive(Debug, PartialEq, Eq)]
pub struct BadInt32 {
    pub property: String,
    /// The value as sent (JSON text), cut short.
    pub value: String,
}

/// Reads every value at `path` under `node` as an int32, in place.
fn read_int32_at(node: &mut Value, path: &[&str]) -> Result<(), BadInt32> {
    match node {
        Value::Array(items) => items.iter_mut().try_for_each(|item| read_int32_at(item, path)),
        Value::Object(map) => read_int32_in(map, path),
        _ => Ok(()),
    }
}

fn read_int32_in(map: &mut Map<String, Value>, path: &[&str]) -> Result<(), BadInt32> {
    let Some((key, rest)) = path.split_first() else {
        return Ok(());
    };
    let Some(child) = map.get_mut(*key) else {
        return Ok(());
    };
    if !rest.is_empty() {
        return read_int32_at(child, rest);
    }
    match int32(child) {
        Some(n) => {
            *child = Value::from(n);
            Ok(())
        }
        None if child.is_null() => Ok(()),
        None => Err(BadInt32 {
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

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
    fn paths_reach_into_arrays_and_leave_absent_properties_alone() {
        let mut body = json!({
            "targetDedicatedNodes": "2",
            "virtualMachineConfiguration": {"dataDisks": [{"lun": "0", "diskSizeGB": 64}, {"lun": 1}]},
        });
        for path in POOL {
            read_int32_at(&mut body, path).unwrap();
        }
        assert_eq!(
            body,
            json!({
                "targetDedicatedNodes": 2,
                "virtualMachineConfiguration": {"dataDisks": [{"lun": 0, "diskSizeGB": 64}, {"lun": 1}]},
            })
        );
    }

    #[test]
    fn a_bad_value_is_named_with_its_property() {
        let mut body = json!({"virtualMachineConfiguration": {"dataDisks": [{"lun": 0}, {"lun": "one"}]}});
        let bad = read_int32_at(&mut body, &["virtualMachineConfiguration", "dataDisks", "lun"]).unwrap_err();
        assert_eq!(
            bad,
            BadInt32 {
                property: "lun".into(),
                value: "\"one\"".into()
            }
        );
    }

    proptest! {
        #[test]
        fn every_i32_written_as_text_reads_back(n in any::<i32>(), pad in "[ \t]{0,2}") {
            let text = format!("{pad}{n}{pad}");
            prop_assert_eq!(int32(&json!(text)), Some(n));
        }

        #[test]
        fn any_string_reads_as_the_number_rust_parses_or_not_at_all(s in "\\PC{0,12}") {
            let expected = s.trim().strip_prefix('+').unwrap_or(s.trim()).parse::<i32>().ok()
                .filter(|_| !s.trim().starts_with("+-") && !s.trim().starts_with("++"));
            prop_assert_eq!(int32(&json!(s)), expected);
        }

        #[test]
        fn any_body_is_read_or_refused_without_panicking(body in any::<Vec<u8>>()) {
            if let Ok(mut value) = serde_json::from_slice::<Value>(&body) {
                for path in POOL {
                    let _ = read_int32_at(&mut value, path);
                }
            }
        }
    }
}
