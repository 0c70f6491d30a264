//! Azure resource ids, parsed and validated before any of them goes into a URL. Each kind of id the
//! pipeline handles is its own type, so a snapshot id cannot be passed where a gallery image version
//! is expected, and every name inside has passed Azure's naming rules.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid resource id `{id}`: {reason}")]
pub struct IdError {
    pub id: String,
    pub reason: String,
}

fn fail(id: &str, reason: impl Into<String>) -> IdError {
    IdError {
        id: id.to_string(),
        reason: reason.into(),
    }
}

/// A subscription id: a GUID.
pub fn check_subscription(id: &str, sub: &str) -> Result<(), IdError> {
    let ok = sub.len() == 36
        && sub.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(())
    } else {
        Err(fail(id, format!("subscription `{sub}` is not a GUID")))
    }
}

/// Resource group: 1–90 of letters, digits, `_ - . ( )`, not ending in a period.
pub fn check_resource_group(id: &str, rg: &str) -> Result<(), IdError> {
    let ok = !rg.is_empty()
        && rg.len() <= 90
        && rg.chars().all(|c| c.is_alphanumeric() || "_-.()".contains(c))
        && !rg.ends_with('.');
    if ok {
        Ok(())
    } else {
        Err(fail(id, format!("resource group `{rg}` is not a valid name")))
    }
}

/// A generic ARM resource name: 1–80 characters without URL-significant characters.
pub fn check_name(id: &str, what: &str, name: &str) -> Result<(), IdError> {
    let ok =
        !name.is_empty() && name.len() <= 80 && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(fail(id, format!("{what} `{name}` is not a valid name")))
    }
}

/// Gallery names: letters, digits, `_` and `.` (not at either end), at most 80; no dashes.
pub fn gallery_name_ok(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 80
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Image definition names: letters, digits, `_ . -` (alphanumeric at both ends), at most 80.
pub fn definition_name_ok(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 80
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// Image version names: `Major.Minor.Patch`, each a 32-bit integer.
pub fn version_name_ok(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()) && p.parse::<i32>().is_ok())
}

/// Batch pool ids: 1–64 letters, digits, `-` and `_`.
pub fn pool_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// The parts every resource id shares, split and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parsed {
    subscription: String,
    resource_group: String,
    namespace: String,
    /// (type, name) pairs after the namespace, e.g. [("galleries","g"),("images","d")].
    chain: Vec<(String, String)>,
}

fn parse(id: &str) -> Result<Parsed, IdError> {
    if !id.starts_with('/') {
        return Err(fail(id, "must start with /subscriptions/"));
    }
    if id.contains(['?', '#', '%', ' ', '\\']) || id.contains("//") || id.contains("..") {
        return Err(fail(id, "contains characters not allowed in a resource id"));
    }
    let s: Vec<&str> = id[1..].split('/').collect();
    if s.len() < 6 || !s[0].eq_ignore_ascii_case("subscriptions") || !s[2].eq_ignore_ascii_case("resourceGroups") {
        return Err(fail(
            id,
            "expected /subscriptions/{id}/resourceGroups/{group}/providers/...",
        ));
    }
    if !s[4].eq_ignore_ascii_case("providers") {
        return Err(fail(id, "expected `providers` after the resource group"));
    }
    check_subscription(id, s[1])?;
    check_resource_group(id, s[3])?;
    let rest = &s[6..];
    if rest.is_empty() || !rest.len().is_multiple_of(2) {
        return Err(fail(id, "expected type/name pairs after the provider namespace"));
    }
    let chain: Vec<(String, String)> = rest.chunks(2).map(|p| (p[0].to_string(), p[1].to_string())).collect();
    for (kind, name) in &chain {
        check_name(id, kind, name)?;
    }
    Ok(Parsed {
        subscription: s[1].to_string(),
        resource_group: s[3].to_string(),
        namespace: s[5].to_string(),
        chain,
    })
}

fn expect_shape(id: &str, p: &Parsed, namespace: &str, types: &[&str]) -> Result<(), IdError> {
    let shape_ok = p.namespace.eq_ignore_ascii_case(namespace)
        && p.chain.len() == types.len()
        && p.chain
            .iter()
            .zip(types)
            .all(|((t, _), want)| t.eq_ignore_ascii_case(want));
    if shape_ok {
        Ok(())
    } else {
        Err(fail(id, format!("expected {namespace}/{}", types.join("/…/"))))
    }
}

macro_rules! resource_id {
    ($(#[$doc:meta])* $name:ident, $ns:literal, [$($ty:literal),+], $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name {
            subscription: String,
            resource_group: String,
            names: Vec<String>,
        }

        impl $name {
            const TYPES: &'static [&'static str] = &[$($ty),+];

            pub fn parse(id: &str) -> Result<$name, IdError> {
                let p = parse(id)?;
                expect_shape(id, &p, $ns, Self::TYPES)?;
                let names: Vec<String> = p.chain.into_iter().map(|(_, n)| n).collect();
                let check: fn(&str, &[String]) -> Result<(), IdError> = $check;
                check(id, &names)?;
                Ok($name { subscription: p.subscription, resource_group: p.resource_group, names })
            }

            pub fn new(subscription: &str, resource_group: &str, names: &[&str]) -> Result<$name, IdError> {
                let mut id = format!("/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/{}", $ns);
                for (ty, name) in Self::TYPES.iter().zip(names) {
                    id.push_str(&format!("/{ty}/{name}"));
                }
                $name::parse(&id)
            }

            pub fn subscription(&self) -> &str {
                &self.subscription
            }

            pub fn resource_group(&self) -> &str {
                &self.resource_group
            }

            /// The last name in the id (the resource's own name).
            pub fn name(&self) -> &str {
                self.names.last().expect("ids have a name")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "/subscriptions/{}/resourceGroups/{}/providers/{}", self.subscription, self.resource_group, $ns)?;
                for (ty, name) in Self::TYPES.iter().zip(&self.names) {
                    write!(f, "/{ty}/{name}")?;
                }
                Ok(())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                $name::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    };
}

fn no_extra(_: &str, _: &[String]) -> Result<(), IdError> {
    Ok(())
}

resource_id!(
    /// A virtual machine (the prepared build VM).
    VmId, "Microsoft.Compute", ["virtualMachines"], no_extra
);
resource_id!(
    /// A managed disk.
    DiskId, "Microsoft.Compute", ["disks"], no_extra
);
resource_id!(
    /// A disk snapshot.
    SnapshotId, "Microsoft.Compute", ["snapshots"], no_extra
);
resource_id!(
    /// A managed image.
    ImageId, "Microsoft.Compute", ["images"], no_extra
);
resource_id!(
    /// An Azure Compute Gallery.
    GalleryId, "Microsoft.Compute", ["galleries"], |id, n| {
        if gallery_name_ok(&n[0]) { Ok(()) } else {
            Err(fail(id, format!("gallery name `{}` may hold only letters, digits, `_` and `.` (no dashes), at most 80", n[0])))
        }
    }
);
resource_id!(
    /// A gallery image definition.
    GalleryImageId, "Microsoft.Compute", ["galleries", "images"], |id, n| {
        if !gallery_name_ok(&n[0]) {
            return Err(fail(id, format!("gallery name `{}` may hold only letters, digits, `_` and `.`", n[0])));
        }
        if definition_name_ok(&n[1]) { Ok(()) } else {
            Err(fail(id, format!("image definition name `{}` is not valid", n[1])))
        }
    }
);
resource_id!(
    /// A gallery image version: what a Batch pool's `virtualMachineImageId` names.
    GalleryImageVersionId, "Microsoft.Compute", ["galleries", "images", "versions"], |id, n| {
        if !gallery_name_ok(&n[0]) {
            return Err(fail(id, format!("gallery name `{}` may hold only letters, digits, `_` and `.`", n[0])));
        }
        if !definition_name_ok(&n[1]) {
            return Err(fail(id, format!("image definition name `{}` is not valid", n[1])));
        }
        if version_name_ok(&n[2]) { Ok(()) } else {
            Err(fail(id, format!("version `{}` must be Major.Minor.Patch of 32-bit integers", n[2])))
        }
    }
);
resource_id!(
    /// A Batch account (management plane).
    BatchAccountId, "Microsoft.Batch", ["batchAccounts"], no_extra
);

impl GalleryImageId {
    pub fn gallery(&self) -> GalleryId {
        GalleryId::new(&self.subscription, &self.resource_group, &[&self.names[0]]).expect("checked on parse")
    }

    pub fn version(&self, version: &str) -> Result<GalleryImageVersionId, IdError> {
        GalleryImageVersionId::new(
            &self.subscription,
            &self.resource_group,
            &[&self.names[0], &self.names[1], version],
        )
    }
}

impl GalleryImageVersionId {
    pub fn definition(&self) -> GalleryImageId {
        GalleryImageId::new(
            &self.subscription,
            &self.resource_group,
            &[&self.names[0], &self.names[1]],
        )
        .expect("checked on parse")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: &str = "11111111-1111-4111-8111-111111111111";

    #[test]
    fn a_version_id_round_trips_and_knows_its_parent() {
        let text = format!(
            "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/galleries/g_1/images/ubuntu-22/versions/2026.1126.0"
        );
        let id = GalleryImageVersionId::parse(&text).unwrap();
        assert_eq!(id.to_string(), text);
        assert_eq!(id.name(), "2026.1126.0");
        assert_eq!(id.definition().name(), "ubuntu-22");
        assert_eq!(id.definition().gallery().name(), "g_1");
    }

    #[test]
    fn bad_ids_say_why() {
        let cases = [
            ("subscriptions/x", "must start"),
            (
                "/subscriptions/nope/resourceGroups/rg/providers/Microsoft.Compute/snapshots/s",
                "GUID",
            ),
            (
                &format!("/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/images/s"),
                "expected Microsoft.Compute/snapshots",
            ),
            (
                &format!("/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/snapshots/a?b"),
                "characters",
            ),
            (
                &format!("/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/snapshots/../x"),
                "characters",
            ),
        ];
        for (text, why) in cases {
            let err = SnapshotId::parse(text).unwrap_err();
            assert!(err.reason.contains(why), "{text}: {err}");
        }
        let dash = format!("/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/galleries/my-gallery");
        assert!(GalleryId::parse(&dash).unwrap_err().reason.contains("no dashes"));
        let version = format!(
            "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/d/versions/1.2"
        );
        assert!(GalleryImageVersionId::parse(&version).is_err());
    }

    #[test]
    fn names() {
        assert!(version_name_ok("2026.1126.0"));
        assert!(!version_name_ok("2026.1126.99999999999"));
        assert!(pool_id_ok("nightly-2026_1126"));
        assert!(!pool_id_ok("has space"));
    }
}
