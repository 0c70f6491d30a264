//! What `AzureClient` logs, captured from a real exchange with the emulator: each request with its
//! method, path, status, request id and duration, retries with their wait, and never a client
//! secret, a token or an `Authorization` header, at any level the Azure crates log at. A binary of
//! its own, because capturing logs needs the process-wide tracing subscriber.

#[path = "it/helpers.rs"]
mod helpers;

use std::io::Write;
use std::sync::{Arc, Mutex};

use helpers::*;
use sigrun::azure::{AzureApi, AzureClient, AzureSettings, CredentialSettings, Secret};
use sigrun::model::ids::{GalleryId, VmId};

/// Collects formatted log lines.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn settings_for(emu: &TestEmulator, app: (&str, &str)) -> AzureSettings {
    let mut settings = AzureSettings::new(CredentialSettings::ClientSecret {
        tenant_id: TENANT.to_string(),
        client_id: app.0.to_string(),
        client_secret: Secret::new(app.1),
    });
    settings.cloud.authority_host = emu.base().to_string();
    settings.cloud.resource_manager = emu.base().to_string();
    settings.extra_ca_cert = emu.emulator.info().ca_cert.clone().map(Into::into);
    settings.retry.min_delay_ms = 50;
    settings
}

#[tokio::test]
async fn logs_say_what_happened_and_nothing_secret() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "sigrun::azure=trace,azure_core=trace,azure_identity=trace,typespec_client_core=trace,reqwest=trace",
        ))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let emu = start_fast().await;
    let azure = AzureClient::new(&settings_for(&emu, PIPELINE_APP)).unwrap();
    let vm = VmId::new(SUB_IMAGING, "rg-imaging", &["build-ubuntu-2204"]).unwrap();
    azure.get_vm(&vm).await.unwrap();
    emu.set_faults("429:p=1,retry_after=0.1,times=1").await;
    azure.get_vm(&vm).await.unwrap();
    emu.set_faults("").await;
    let gallery = GalleryId::new(SUB_IMAGING, "rg-gallery", &["logged_gallery"]).unwrap();
    AzureClient::new(&settings_for(&emu, READER_APP))
        .unwrap()
        .put_gallery(&gallery, "westeurope", &Default::default())
        .await
        .unwrap_err();
    let wrong = (PIPELINE_APP.0, "not-the-secret-but-still-private");
    AzureClient::new(&settings_for(&emu, wrong))
        .unwrap()
        .get_vm(&vm)
        .await
        .unwrap_err();

    let issued = emu.arm_token().await;
    let token_header = &issued[..issued.find('.').unwrap()];
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for secret in [PIPELINE_APP.1, READER_APP.1, wrong.1] {
        assert!(!log.contains(secret), "a client secret leaked into the log:\n{log}");
    }
    assert!(!log.contains(token_header), "a token leaked into the log:\n{log}");
    assert!(
        !log.to_ascii_lowercase().contains("bearer ey"),
        "a token leaked:\n{log}"
    );

    // What an operator needs: method, path, status, request id, duration, and the retries.
    let requests: Vec<&str> = log.lines().filter(|l| l.contains("azure request ")).collect();
    assert!(
        requests.iter().any(|l| l.contains("method=GET")
            && l.contains("virtualMachines/build-ubuntu-2204")
            && l.contains("status=200")
            && l.contains("request_id=")
            && l.contains("elapsed_ms=")),
        "{log}"
    );
    assert!(requests.iter().any(|l| l.contains("status=429")), "{log}");
    assert!(
        requests
            .iter()
            .any(|l| l.contains("method=PUT") && l.contains("status=403")),
        "{log}"
    );
    assert!(log.contains("will be retried") && log.contains("wait_ms=100"), "{log}");
    assert!(
        !log.contains("api-version="),
        "paths are logged without their query:\n{log}"
    );
}
