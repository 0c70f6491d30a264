//! `AzureClient` configured with `kind = "managed_identity"` against the emulator's App Service
//! style endpoint: ARM and Batch tokens both come from the managed identity. A binary of its own,
//! because the credential reads `IDENTITY_ENDPOINT`/`IDENTITY_HEADER` from the process environment.

use sigrun::azure::{AzureApi, AzureClient, AzureSettings, CredentialSettings};
use sigrun::emulator::{Emulator, EmulatorOptions};
use sigrun::model::ids::{BatchAccountId, VmId};

const SUB_IMAGING: &str = "11111111-1111-4111-8111-111111111111";
const SUB_COMPUTE: &str = "22222222-2222-4222-8222-222222222222";
const WORKER_IDENTITY: &str = "5a1b2c3d-0000-4000-8000-00000000c001";

#[tokio::test]
async fn a_managed_identity_reaches_arm_and_batch() {
    let emulator = Emulator::start(EmulatorOptions::default()).await.expect("emulator");
    let info = emulator.info().clone();
    // SAFETY: this binary holds one test; nothing else reads the environment concurrently.
    unsafe {
        std::env::set_var("IDENTITY_ENDPOINT", &info.identity_endpoint);
        std::env::set_var("IDENTITY_HEADER", &info.identity_header);
    }
    let mut settings = AzureSettings::new(CredentialSettings::ManagedIdentity {
        client_id: Some(WORKER_IDENTITY.to_string()),
    });
    settings.cloud.resource_manager = info.base_url.clone();
    settings.extra_ca_cert = info.ca_cert.clone().map(Into::into);
    let azure = AzureClient::new(&settings).expect("client");

    let vm = azure
        .get_vm(&VmId::new(SUB_IMAGING, "rg-imaging", &["build-ubuntu-2204"]).unwrap())
        .await
        .expect("ARM with a managed identity token");
    assert_eq!(vm.os_type, "Linux");
    let account = azure
        .get_batch_account(&BatchAccountId::new(SUB_COMPUTE, "rg-batch", &["sigrunweu"]).unwrap())
        .await
        .expect("Batch account");
    let images = azure
        .supported_images(&account)
        .await
        .expect("Batch with a managed identity token");
    assert!(!images.is_empty());
    assert!(format!("{azure:?}").contains("managed_identity"));
}
