//! The images Batch supports and the node agent SKU each needs (`GET /supportedimages`). The emulator
//! checks a pool's `nodeAgentSKUId` against this list, as Batch does.

use serde_json::{Value, json};

pub struct SupportedImage {
    pub node_agent_sku: &'static str,
    pub publisher: &'static str,
    pub offer: &'static str,
    pub sku: &'static str,
    pub os_type: &'static str,
    pub end_of_life: Option<&'static str>,
}

pub const SUPPORTED: &[SupportedImage] = &[
    SupportedImage {
        node_agent_sku: "batch.node.ubuntu 24.04",
        publisher: "canonical",
        offer: "ubuntu-24_04-lts",
        sku: "server",
        os_type: "linux",
        end_of_life: None,
    },
    SupportedImage {
        node_agent_sku: "batch.node.ubuntu 22.04",
        publisher: "canonical",
        offer: "0001-com-ubuntu-server-jammy",
        sku: "22_04-lts",
        os_type: "linux",
        end_of_life: None,
    },
    SupportedImage {
        node_agent_sku: "batch.node.ubuntu 22.04",
        publisher: "canonical",
        offer: "0001-com-ubuntu-server-jammy",
        sku: "22_04-lts-gen2",
        os_type: "linux",
        end_of_life: None,
    },
    SupportedImage {
        node_agent_sku: "batch.node.ubuntu 20.04",
        publisher: "canonical",
        offer: "0001-com-ubuntu-server-focal",
        sku: "20_04-lts",
        os_type: "linux",
        end_of_life: Some("2025-04-23T00:00:00Z"),
    },
    SupportedImage {
        node_agent_sku: "batch.node.el 9",
        publisher: "almalinux",
        offer: "almalinux-x86_64",
        sku: "9-gen2",
        os_type: "linux",
        end_of_life: None,
    },
    SupportedImage {
        node_agent_sku: "batch.node.debian 12",
        publisher: "debian",
        offer: "debian-12",
        sku: "12",
        os_type: "linux",
        end_of_life: None,
    },
    SupportedImage {
        node_agent_sku: "batch.node.ubuntu 22.04",
        publisher: "microsoft-azure-batch",
        offer: "ubuntu-server-container",
        sku: "22-04-lts",
        os_type: "linux",
        end_of_life: None,
    },
    SupportedImage {
        node_agent_sku: "batch.node.windows amd64",
        publisher: "microsoftwindowsserver",
        offer: "windowsserver",
        sku: "2022-datacenter",
        os_type: "windows",
        end_of_life: None,
    },
    SupportedImage {
        node_agent_sku: "batch.node.windows amd64",
        publisher: "microsoftwindowsserver",
        offer: "windowsserver",
        sku: "2022-datacenter-g2",
        os_type: "windows",
        end_of_life: None,
    },
    SupportedImage {
        node_agent_sku: "batch.node.windows amd64",
        publisher: "microsoftwindowsserver",
        offer: "windowsserver",
        sku: "2019-datacenter",
        os_type: "windows",
        end_of_life: None,
    },
];

/// The OS type (`linux`/`windows`) a node agent SKU runs, if Batch knows the SKU.
pub fn sku_os(node_agent_sku: &str) -> Option<&'static str> {
    SUPPORTED
        .iter()
        .find(|i| i.node_agent_sku.eq_ignore_ascii_case(node_agent_sku))
        .map(|i| i.os_type)
}

pub fn find_marketplace(publisher: &str, offer: &str, sku: &str) -> Option<&'static SupportedImage> {
    SUPPORTED.iter().find(|i| {
        i.publisher.eq_ignore_ascii_case(publisher)
            && i.offer.eq_ignore_ascii_case(offer)
            && i.sku.eq_ignore_ascii_case(sku)
    })
}

pub fn to_json(image: &SupportedImage) -> Value {
    let mut v = json!({
        "nodeAgentSKUId": image.node_agent_sku,
        "imageReference": {"publisher": image.publisher, "offer": image.offer, "sku": image.sku, "version": "latest"},
        "verificationType": "verified",
        "capabilities": if image.os_type == "linux" { json!(["DockerCompatible"]) } else { json!([]) },
        "osType": image.os_type,
    });
    if let Some(eol) = image.end_of_life {
        v["batchSupportEndOfLife"] = json!(eol);
    }
    v
}
