//! What the Batch service learns from ARM when a pool names a gallery image: the image's OS, state
//! and replicas, and whether the caller and the subscriptions allow its use. Kept apart from both
//! front ends because it is the one place where Batch reads compute state.

use super::Ctx;
use super::auth;
use super::clock::EmuTime;
use super::state::{Kind, ReplicationState, Resource, State};
use super::world::BatchAccount;

pub struct PoolImage {
    /// `linux` or `windows`.
    pub os_type: String,
    pub replicas_in_region: u32,
}

/// Why Batch refuses the image, in Batch's error terms.
pub struct Refusal {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub reason: String,
}

impl Refusal {
    fn property(reason: String) -> Refusal {
        Refusal {
            status: 400,
            code: "InvalidPropertyValue".into(),
            message: "The value provided for one of the properties in the request body is invalid.".into(),
            reason,
        }
    }

    pub fn values(&self) -> Vec<(&str, &str)> {
        vec![
            ("PropertyName", "virtualMachineImageId"),
            ("Reason", self.reason.as_str()),
        ]
    }
}

struct ImageId {
    sub: String,
    rg: String,
    gallery: String,
    definition: String,
    version: Option<String>,
}

fn parse(id: &str) -> Option<ImageId> {
    let s: Vec<&str> = id.trim_start_matches('/').split('/').collect();
    let is = |i: usize, v: &str| s.get(i).is_some_and(|x| x.eq_ignore_ascii_case(v));
    let shape = is(0, "subscriptions")
        && is(2, "resourceGroups")
        && is(4, "providers")
        && is(5, "Microsoft.Compute")
        && is(6, "galleries")
        && is(8, "images");
    match (shape, s.len()) {
        (true, 10) => Some(ImageId {
            sub: s[1].into(),
            rg: s[3].into(),
            gallery: s[7].into(),
            definition: s[9].into(),
            version: None,
        }),
        (true, 12) if is(10, "versions") => Some(ImageId {
            sub: s[1].into(),
            rg: s[3].into(),
            gallery: s[7].into(),
            definition: s[9].into(),
            version: Some(s[11].into()),
        }),
        _ => None,
    }
}

fn definition_id(p: &ImageId) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/galleries/{}/images/{}",
        p.sub, p.rg, p.gallery, p.definition
    )
}

fn version_key(name: &str) -> Vec<i64> {
    name.split('.').map(|p| p.parse().unwrap_or(-1)).collect()
}

/// The version a pool gets: the named one, or the newest not excluded from "latest".
fn resolve_version<'a>(st: &'a State, p: &ImageId, now: EmuTime) -> Option<&'a Resource> {
    let def = definition_id(p);
    match &p.version {
        Some(v) => st.get(&format!("{def}/versions/{v}")),
        None => st
            .children(&def, Kind::GalleryImageVersion)
            .into_iter()
            .filter(|r| {
                r.body
                    .pointer("/properties/publishingProfile/excludeFromLatest")
                    .and_then(|v| v.as_bool())
                    != Some(true)
            })
            .filter(|r| super::arm::version_state(r, now) == "Succeeded")
            .max_by_key(|r| version_key(r.id.rsplit('/').next().unwrap_or_default())),
    }
}

pub fn replicas_in_region(st: &State, image_id: &str, region: &str, now: EmuTime) -> Option<u32> {
    let p = parse(image_id)?;
    let version = resolve_version(st, &p, now)?;
    version
        .replication
        .iter()
        .find(|r| r.region.eq_ignore_ascii_case(region) && r.state(now) == ReplicationState::Completed)
        .map(|r| r.replicas)
}

pub fn gallery_image_for_pool(
    ctx: &Ctx,
    st: &State,
    image_id: &str,
    account: &BatchAccount,
    oid: &str,
    now: EmuTime,
) -> Result<PoolImage, Refusal> {
    let p = parse(image_id).ok_or_else(|| {
        Refusal::property(format!(
            "'{image_id}' is not the ARM id of a Compute Gallery image or image version."
        ))
    })?;
    let tenant_of = |sub: &str| {
        ctx.world
            .subscriptions
            .iter()
            .find(|s| s.id.eq_ignore_ascii_case(sub))
            .map(|s| s.tenant.clone())
    };
    let account_tenant = tenant_of(&account.subscription).unwrap_or_default();
    match tenant_of(&p.sub) {
        Some(t) if t.eq_ignore_ascii_case(&account_tenant) => {}
        _ => {
            return Err(Refusal::property(format!(
                "The image's subscription '{}' is not in the Azure AD tenant of the Batch account ('{account_tenant}'); gallery images must be in the same tenant.",
                p.sub
            )));
        }
    }
    if !p.sub.eq_ignore_ascii_case(&account.subscription)
        && super::arm::registration_state(ctx, st, &p.sub, "Microsoft.Batch") != "Registered"
    {
        return Err(Refusal {
            status: 409,
            code: "MissingSubscriptionRegistration".into(),
            message: format!(
                "The subscription '{}' of the image is not registered to use namespace 'Microsoft.Batch'.",
                p.sub
            ),
            reason: format!(
                "Register the Microsoft.Batch resource provider in subscription '{}' to use its gallery images.",
                p.sub
            ),
        });
    }
    let definition = st
        .get(&definition_id(&p))
        .filter(|d| d.deleting.is_none())
        .ok_or_else(|| Refusal::property(format!("The gallery image '{}' does not exist.", definition_id(&p))))?;
    let version = resolve_version(st, &p, now).ok_or_else(|| {
        Refusal::property(match &p.version {
            Some(v) => format!("The gallery image version '{v}' does not exist."),
            None => "The gallery image has no version that can be used as latest.".to_string(),
        })
    })?;
    let props = &definition.body["properties"];
    if !props["osState"]
        .as_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("Generalized"))
    {
        return Err(Refusal::property(
            "The image is specialized; Batch pools need a generalized gallery image.".to_string(),
        ));
    }
    const ACTION: &str = "Microsoft.Compute/disks/beginGetAccess/action";
    if !auth::allowed(&ctx.world, oid, ACTION, &version.id) {
        return Err(Refusal {
            status: 403,
            code: "InsufficientPermissions".into(),
            message: format!(
                "The client with object id '{oid}' does not have authorization to perform action '{ACTION}' over scope '{}'.",
                version.id
            ),
            reason: format!("The identity needs a role allowing '{ACTION}' on the image (Reader is not enough)."),
        });
    }
    let region = &account.location;
    let replica = version
        .replication
        .iter()
        .find(|r| r.region.eq_ignore_ascii_case(region));
    let replicas = match replica.map(|r| (r, r.state(now))) {
        Some((r, ReplicationState::Completed)) => r.replicas,
        Some((_, state)) => {
            return Err(Refusal::property(format!(
                "The gallery image version is not available in region '{region}' yet (replication state {state:?})."
            )));
        }
        None => {
            return Err(Refusal::property(format!(
                "The gallery image version has no replica in region '{region}', the region of the Batch account."
            )));
        }
    };
    Ok(PoolImage {
        os_type: props["osType"].as_str().unwrap_or_default().to_ascii_lowercase(),
        replicas_in_region: replicas,
    })
}
