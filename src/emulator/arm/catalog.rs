//! What a subscription can use, read-only: its regions (Subscriptions – List Locations) and the VM
//! sizes Batch offers in a region (Batch management's Location – List Supported Virtual Machine
//! SKUs, paged with `nextLink`). Planning reads both to refuse a region or size Azure does not have
//! before anything is created.

use serde_json::{Value, json};

use super::{ArmError, Caller, Family, authorize, check_api_version, only_get};
use crate::emulator::Ctx;
use crate::emulator::http::{Request, Response};
use crate::emulator::{regions, vm_sizes};

/// Sizes per page when the caller does not ask for fewer (`maxresults`).
pub(in crate::emulator) const SKU_PAGE: usize = 20;

/// `GET /subscriptions/{sub}/locations`: every region, as `{"value": [...]}`.
pub fn locations(ctx: &Ctx, req: &Request, caller: &Caller, sub: &str) -> Result<Response, ArmError> {
    only_get(req)?;
    check_api_version(req, Family::Subscriptions, "locations", "global")?;
    authorize(
        ctx,
        caller,
        "Microsoft.Resources/subscriptions/locations/read",
        &format!("/subscriptions/{sub}"),
    )?;
    let value: Vec<Value> = regions::all()
        .map(|name| {
            json!({
                "id": format!("/subscriptions/{sub}/locations/{name}"),
                "name": name,
                "type": "Region",
                "displayName": regions::display(name),
                "regionalDisplayName": regions::display(name),
                "metadata": {"regionType": "Physical", "regionCategory": "Recommended"},
            })
        })
        .collect();
    Ok(Response::json(200, &json!({ "value": value })))
}

/// `GET /subscriptions/{sub}/providers/Microsoft.Batch/locations/{location}/virtualMachineSkus`.
pub fn batch_vm_skus(
    ctx: &Ctx,
    req: &Request,
    caller: &Caller,
    sub: &str,
    location: &str,
) -> Result<Response, ArmError> {
    only_get(req)?;
    check_api_version(req, Family::BatchManagement, "locations/virtualMachineSkus", location)?;
    authorize(
        ctx,
        caller,
        "Microsoft.Batch/locations/virtualMachineSkus/read",
        &format!("/subscriptions/{sub}"),
    )?;
    let Some(region) = regions::canonical(location) else {
        return Err(ArmError::new(
            400,
            "LocationNotAvailableForResourceType",
            format!(
                "The provided location '{}' is not available for resource type 'Microsoft.Batch/locations'.",
                location.chars().take(64).collect::<String>()
            ),
        ));
    };
    let page_size = match req.query("maxresults") {
        None => SKU_PAGE,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n > 0 => n.min(SKU_PAGE),
            _ => {
                return Err(ArmError::invalid(
                    "maxresults",
                    "maxresults is a positive whole number.",
                ));
            }
        },
    };
    let skip = match req.query("$skiptoken") {
        None => 0,
        Some(text) => text
            .parse::<usize>()
            .map_err(|_| ArmError::invalid("$skiptoken", "The skip token is not one this service gave."))?,
    };
    let all = vm_sizes::rendered();
    let value: Vec<Value> = all.iter().skip(skip).take(page_size).cloned().collect();
    let mut body = json!({ "value": value });
    let next = skip.saturating_add(page_size);
    if next < all.len() {
        body["nextLink"] = json!(format!(
            "{}/subscriptions/{sub}/providers/Microsoft.Batch/locations/{region}/virtualMachineSkus?api-version={}&maxresults={page_size}&$skiptoken={next}",
            req.base_url,
            req.query("api-version").unwrap_or_default(),
        ));
    }
    Ok(Response::json(200, &body))
}
