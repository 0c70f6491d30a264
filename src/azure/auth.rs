//! The token credential for the configured identity, built on azure_identity. Every credential that
//! talks HTTP uses the client's one reqwest client as its transport (so it trusts the same extra CA
//! and shares connections) and the configured authority host (sovereign clouds, the emulator). The
//! Azure CLI credential runs `az` on every call, so it gets a small per-scope cache here.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport};
use azure_identity::{
    AzureCliCredential, AzureCliCredentialOptions, ClientAssertionCredentialOptions, ClientSecretCredential,
    ClientSecretCredentialOptions, ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};
use tokio::sync::Mutex;

use super::config::{AzureSettings, CredentialSettings, SettingsError};

/// Builds the credential `settings.credential` describes, sending its requests through `client`.
pub fn credential(
    settings: &AzureSettings,
    client: &reqwest::Client,
) -> Result<Arc<dyn TokenCredential>, SettingsError> {
    let options = client_options(settings, client);
    let failed = |e: azure_core::Error| SettingsError::new("credential", e.to_string());
    let credential: Arc<dyn TokenCredential> = match &settings.credential {
        CredentialSettings::ClientSecret {
            tenant_id,
            client_id,
            client_secret,
        } => ClientSecretCredential::new(
            tenant_id,
            client_id.clone(),
            Secret::new(client_secret.expose().to_string()),
            Some(ClientSecretCredentialOptions {
                client_options: options,
            }),
        )
        .map_err(failed)?,
        CredentialSettings::WorkloadIdentity {
            tenant_id,
            client_id,
            token_file,
        } => WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
            credential_options: ClientAssertionCredentialOptions {
                client_options: options,
            },
            client_id: client_id.clone(),
            tenant_id: tenant_id.clone(),
            token_file_path: token_file.clone(),
        }))
        .map_err(failed)?,
        CredentialSettings::ManagedIdentity { client_id } => {
            ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(UserAssignedId::ClientId),
                client_options: options,
            }))
            .map_err(failed)?
        }
        CredentialSettings::AzureCli { tenant_id } => {
            let cli = AzureCliCredential::new(Some(AzureCliCredentialOptions {
                tenant_id: tenant_id.clone(),
                ..Default::default()
            }))
            .map_err(failed)?;
            Arc::new(Cached::new(cli))
        }
    };
    Ok(credential)
}

fn client_options(settings: &AzureSettings, client: &reqwest::Client) -> ClientOptions {
    let mut cloud = CustomConfiguration::default();
    cloud.authority_host = settings.cloud.authority_host.clone();
    // The token endpoint gets the same small retry budget as every other request, so a dead
    // authority fails in seconds rather than after azure_core's default minute.
    let retry = RetryOptions::exponential(ExponentialRetryOptions {
        initial_delay: time::Duration::milliseconds(settings.retry.min_delay_ms as i64),
        max_retries: settings.retry.max_attempts.saturating_sub(1),
        max_total_elapsed: time::Duration::seconds(settings.retry.max_total_secs as i64),
        max_delay: time::Duration::milliseconds(settings.retry.max_delay_ms as i64),
    });
    ClientOptions {
        transport: Some(Transport::new(Arc::new(client.clone()))),
        cloud: Some(Arc::new(CloudConfiguration::Custom(cloud))),
        retry,
        ..Default::default()
    }
}

/// Tokens kept per scope until five minutes before they expire.
#[derive(Debug)]
struct Cached<C> {
    inner: Arc<C>,
    tokens: Mutex<HashMap<String, AccessToken>>,
}

impl<C> Cached<C> {
    fn new(inner: Arc<C>) -> Cached<C> {
        Cached {
            inner,
            tokens: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl<C: TokenCredential> TokenCredential for Cached<C> {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let key = scopes.join(" ");
        // Held across the call so concurrent requests run `az` once, not once each.
        let mut tokens = self.tokens.lock().await;
        let fresh_until = time::OffsetDateTime::now_utc() + time::Duration::minutes(5);
        if let Some(token) = tokens.get(&key).filter(|t| t.expires_on > fresh_until) {
            return Ok(token.clone());
        }
        let token = self.inner.get_token(scopes, options).await?;
        tokens.insert(key, token.clone());
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[derive(Debug, Default)]
    struct Counting(AtomicU32);

    #[async_trait]
    impl TokenCredential for Counting {
        async fn get_token(
            &self,
            scopes: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Ok(AccessToken::new(
                format!("{}-{n}", scopes[0]),
                time::OffsetDateTime::now_utc() + time::Duration::hours(1),
            ))
        }
    }

    #[tokio::test]
    async fn cache_keeps_one_token_per_scope() {
        let inner = Arc::new(Counting::default());
        let cached = Cached::new(inner.clone());
        let a = cached.get_token(&["a"], None).await.unwrap();
        let again = cached.get_token(&["a"], None).await.unwrap();
        let b = cached.get_token(&["b"], None).await.unwrap();
        assert_eq!(a.token.secret(), again.token.secret());
        assert_ne!(a.token.secret(), b.token.secret());
        assert_eq!(inner.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn every_kind_builds() {
        let client = reqwest::Client::new();
        let token_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(token_file.path(), "federated-token").unwrap();
        for credential in [
            CredentialSettings::ClientSecret {
                tenant_id: "72f988bf-0000-4000-8000-00000000c0de".into(),
                client_id: "c".into(),
                client_secret: super::super::config::Secret::new("s"),
            },
            CredentialSettings::WorkloadIdentity {
                tenant_id: Some("72f988bf-0000-4000-8000-00000000c0de".into()),
                client_id: Some("c".into()),
                token_file: Some(token_file.path().to_path_buf()),
            },
            CredentialSettings::ManagedIdentity { client_id: None },
            CredentialSettings::AzureCli { tenant_id: None },
        ] {
            let settings = AzureSettings::new(credential.clone());
            credential_or_panic(&settings, &client, credential.kind());
        }
    }

    fn credential_or_panic(settings: &AzureSettings, client: &reqwest::Client, kind: &str) {
        if let Err(err) = credential(settings, client) {
            panic!("{kind}: {err}");
        }
    }
}
