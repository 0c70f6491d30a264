//! `AzureSettings`: where Azure is (cloud endpoints and token scopes, so sovereign clouds and the
//! emulator are a matter of configuration), which identity the program uses, the api-version of
//! each resource provider, and how patient the REST client is (timeout, retries). Parsed strictly:
//! an unknown key is an error, and `validate` rejects values that would send a token somewhere it
//! should not go. The client secret is a [`Secret`], which never prints.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

/// A configuration value that must never appear in logs, `Debug` output or error messages.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the one place that must send it (the credential).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A setting that cannot work, named by its key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("azure.{key}: {message}")]
pub struct SettingsError {
    pub key: String,
    pub message: String,
}

impl SettingsError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> SettingsError {
        SettingsError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Everything the REST client needs to know about Azure.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AzureSettings {
    #[serde(default)]
    pub cloud: CloudSettings,
    pub credential: CredentialSettings,
    /// PEM file of extra CA certificates to trust besides the system roots (the emulator's CA).
    #[serde(default)]
    pub extra_ca_cert: Option<PathBuf>,
    #[serde(default)]
    pub api_versions: ApiVersions,
    /// Limit on one HTTP exchange (connect, send, read the answer).
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    #[serde(default)]
    pub retry: RetrySettings,
    /// Keeping inside ARM's request budget (`[azure.client.pacing]`).
    #[serde(default)]
    pub pacing: super::pacing::PacingSettings,
}

fn default_request_timeout_secs() -> u64 {
    60
}

/// The endpoints and token scopes of one Azure cloud. The defaults are Azure public cloud.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CloudSettings {
    /// Entra ID authority, e.g. `https://login.microsoftonline.com` (must be https).
    pub authority_host: String,
    /// ARM base URL. `http://` is accepted only for a loopback host: the emulator in plain-HTTP mode.
    pub resource_manager: String,
    pub arm_scope: String,
    /// The double slash is Batch's: its resource id is `https://batch.core.windows.net/`.
    pub batch_scope: String,
    /// Batch account endpoints are `{account}.{region}.{suffix}`; a Batch token is only ever sent to
    /// such a host (or to the resource manager's own origin, where the emulator serves Batch).
    pub batch_endpoint_suffix: String,
}

impl Default for CloudSettings {
    fn default() -> Self {
        CloudSettings {
            authority_host: "https://login.microsoftonline.com".into(),
            resource_manager: "https://management.azure.com".into(),
            arm_scope: "https://management.azure.com/.default".into(),
            batch_scope: "https://batch.core.windows.net//.default".into(),
            batch_endpoint_suffix: "batch.azure.com".into(),
        }
    }
}

/// Which identity gets the tokens; `kind` picks the variant.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum CredentialSettings {
    /// An app registration with a client secret.
    ClientSecret {
        tenant_id: String,
        client_id: String,
        client_secret: Secret,
    },
    /// Kubernetes workload identity; unset fields come from `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`
    /// and `AZURE_FEDERATED_TOKEN_FILE`.
    WorkloadIdentity {
        #[serde(default)]
        tenant_id: Option<String>,
        #[serde(default)]
        client_id: Option<String>,
        #[serde(default)]
        token_file: Option<PathBuf>,
    },
    /// The managed identity of the host; `client_id` picks a user-assigned one.
    ManagedIdentity {
        #[serde(default)]
        client_id: Option<String>,
    },
    /// Whoever is logged in to the Azure CLI (for development).
    AzureCli {
        #[serde(default)]
        tenant_id: Option<String>,
    },
}

impl CredentialSettings {
    pub fn kind(&self) -> &'static str {
        match self {
            CredentialSettings::ClientSecret { .. } => "client_secret",
            CredentialSettings::WorkloadIdentity { .. } => "workload_identity",
            CredentialSettings::ManagedIdentity { .. } => "managed_identity",
            CredentialSettings::AzureCli { .. } => "azure_cli",
        }
    }
}

/// The api-version sent to each resource provider. The defaults are the versions of the saved
/// specs the client's request and response shapes follow.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiVersions {
    /// Microsoft.Compute: VMs and managed images.
    pub compute: String,
    /// Microsoft.Compute DiskRP: snapshots.
    pub disk: String,
    /// Microsoft.Compute GalleryRP: galleries, image definitions and versions.
    pub gallery: String,
    /// Microsoft.Resources: provider registration.
    pub resources: String,
    /// Microsoft.Resources subscriptions API: a subscription's locations.
    pub subscriptions: String,
    /// Microsoft.Batch management plane: Batch accounts.
    pub batch_management: String,
    /// Batch data plane.
    pub batch: String,
}

impl Default for ApiVersions {
    fn default() -> Self {
        ApiVersions {
            compute: "2024-07-01".into(),
            disk: "2024-03-02".into(),
            gallery: "2024-03-03".into(),
            resources: "2024-07-01".into(),
            subscriptions: "2022-12-01".into(),
            batch_management: "2024-07-01".into(),
            batch: "2024-07-01.20.0".into(),
        }
    }
}

/// Retries inside the client, for failures that pass in seconds (network, 5xx, 429). Anything
/// longer is the runtime's business: it reschedules the message on a delay queue.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Attempts per request, the first one included.
    pub max_attempts: u32,
    /// First backoff delay; it doubles per retry, with jitter.
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
    /// Total waiting a request may spend on retries. A `Retry-After` that does not fit is not
    /// waited for here: the throttled error is returned with it.
    pub max_total_secs: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 4,
            min_delay_ms: 500,
            max_delay_ms: 8_000,
            max_total_secs: 30,
        }
    }
}

impl RetrySettings {
    pub fn min_delay(&self) -> Duration {
        Duration::from_millis(self.min_delay_ms)
    }

    pub fn max_delay(&self) -> Duration {
        Duration::from_millis(self.max_delay_ms)
    }

    pub fn max_total(&self) -> Duration {
        Duration::from_secs(self.max_total_secs)
    }
}

impl AzureSettings {
    /// Settings for Azure public cloud with the given identity and every other value defaulted.
    pub fn new(credential: CredentialSettings) -> AzureSettings {
        AzureSettings {
            cloud: CloudSettings::default(),
            credential,
            extra_ca_cert: None,
            api_versions: ApiVersions::default(),
            request_timeout_secs: default_request_timeout_secs(),
            retry: RetrySettings::default(),
            pacing: super::pacing::PacingSettings::default(),
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }

    /// The resource manager's base URL, checked.
    pub fn resource_manager_url(&self) -> Result<Url, SettingsError> {
        let key = "cloud.resource_manager";
        let url = parse_base(key, &self.cloud.resource_manager)?;
        match url.scheme() {
            "https" => Ok(url),
            "http" if is_loopback(&url) => Ok(url),
            "http" => Err(SettingsError::new(
                key,
                "plain http is only accepted for a loopback emulator; tokens must not travel unencrypted",
            )),
            other => Err(SettingsError::new(key, format!("unsupported scheme `{other}`"))),
        }
    }

    /// Checks every value the client depends on; `AzureClient::new` calls it.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let authority = parse_base("cloud.authority_host", &self.cloud.authority_host)?;
        if authority.scheme() != "https" {
            return Err(SettingsError::new(
                "cloud.authority_host",
                "must be https (azure_identity refuses anything else)",
            ));
        }
        self.resource_manager_url()?;
        for (key, scope) in [
            ("cloud.arm_scope", &self.cloud.arm_scope),
            ("cloud.batch_scope", &self.cloud.batch_scope),
        ] {
            if !scope.ends_with("/.default") {
                return Err(SettingsError::new(
                    key,
                    format!("`{scope}` is not a `.default` scope (client-credential flows need one)"),
                ));
            }
        }
        let suffix = &self.cloud.batch_endpoint_suffix;
        if suffix.is_empty()
            || suffix.starts_with('.')
            || !suffix.contains('.')
            || !suffix
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
        {
            return Err(SettingsError::new(
                "cloud.batch_endpoint_suffix",
                format!("`{suffix}` is not a DNS suffix such as batch.azure.com"),
            ));
        }
        let versions = &self.api_versions;
        for (key, value) in [
            ("api_versions.compute", &versions.compute),
            ("api_versions.disk", &versions.disk),
            ("api_versions.gallery", &versions.gallery),
            ("api_versions.resources", &versions.resources),
            ("api_versions.batch_management", &versions.batch_management),
            ("api_versions.batch", &versions.batch),
        ] {
            let plain = !value.is_empty() && value.bytes().all(|c| c.is_ascii_alphanumeric() || b"-.".contains(&c));
            if !plain {
                return Err(SettingsError::new(key, format!("`{value}` is not an api-version")));
            }
        }
        if self.request_timeout_secs == 0 {
            return Err(SettingsError::new("request_timeout_secs", "must be at least 1"));
        }
        self.pacing.validate()?;
        if self.retry.max_attempts == 0 {
            return Err(SettingsError::new("retry.max_attempts", "must be at least 1"));
        }
        if self.retry.min_delay_ms > self.retry.max_delay_ms {
            return Err(SettingsError::new(
                "retry.min_delay_ms",
                "must not be larger than retry.max_delay_ms",
            ));
        }
        if let CredentialSettings::ClientSecret {
            tenant_id,
            client_id,
            client_secret,
        } = &self.credential
        {
            for (key, value) in [
                ("credential.tenant_id", tenant_id.as_str()),
                ("credential.client_id", client_id.as_str()),
                ("credential.client_secret", client_secret.expose()),
            ] {
                if value.trim().is_empty() {
                    return Err(SettingsError::new(key, "must not be empty"));
                }
            }
        }
        Ok(())
    }
}

fn parse_base(key: &str, text: &str) -> Result<Url, SettingsError> {
    let url = Url::parse(text).map_err(|e| SettingsError::new(key, format!("`{text}` is not a URL: {e}")))?;
    if url.host_str().is_none() || !url.username().is_empty() || url.password().is_some() {
        return Err(SettingsError::new(
            key,
            format!("`{text}` must be scheme://host[:port]"),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(SettingsError::new(
            key,
            format!("`{text}` must not have a query or fragment"),
        ));
    }
    Ok(url)
}

fn is_loopback(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']);
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
        extra_ca_cert = "/tmp/ca.pem"
        [cloud]
        resource_manager = "https://management.usgovcloudapi.net"
        [credential]
        kind = "client_secret"
        tenant_id = "t"
        client_id = "c"
        client_secret = "hunter2-very-secret"
        [api_versions]
        gallery = "2025-03-03"
    "#;

    #[test]
    fn parses_with_defaults_and_hides_the_secret() {
        let settings: AzureSettings = toml::from_str(TOML).unwrap();
        settings.validate().unwrap();
        assert_eq!(settings.cloud.authority_host, "https://login.microsoftonline.com");
        assert_eq!(settings.cloud.resource_manager, "https://management.usgovcloudapi.net");
        assert_eq!(settings.api_versions.gallery, "2025-03-03");
        assert_eq!(settings.api_versions.disk, "2024-03-02");
        assert_eq!(settings.api_versions.batch, "2024-07-01.20.0");
        assert_eq!(settings.retry, RetrySettings::default());
        assert_eq!(settings.credential.kind(), "client_secret");
        let shown = format!("{settings:?} {settings:#?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let typo = TOML.replace("client_secret = ", "client_sercet = ");
        let err = toml::from_str::<AzureSettings>(&typo).unwrap_err().to_string();
        assert!(err.contains("client_sercet"), "{err}");
        let extra = format!("{TOML}\n[retry]\nmax_attempt = 3\n");
        assert!(toml::from_str::<AzureSettings>(&extra).is_err());
        let kind = TOML.replace("\"client_secret\"\n", "\"certificate\"\n");
        assert!(toml::from_str::<AzureSettings>(&kind).is_err());
    }

    #[test]
    fn other_credential_kinds() {
        let text = "[credential]\nkind = \"workload_identity\"\ntoken_file = \"/var/run/token\"\n";
        let settings: AzureSettings = toml::from_str(text).unwrap();
        assert_eq!(
            settings.credential,
            CredentialSettings::WorkloadIdentity {
                tenant_id: None,
                client_id: None,
                token_file: Some("/var/run/token".into())
            }
        );
        let text = "[credential]\nkind = \"managed_identity\"\n";
        assert_eq!(
            toml::from_str::<AzureSettings>(text).unwrap().credential.kind(),
            "managed_identity"
        );
        let text = "[credential]\nkind = \"azure_cli\"\ntenant_id = \"t\"\n";
        assert_eq!(
            toml::from_str::<AzureSettings>(text).unwrap().credential.kind(),
            "azure_cli"
        );
    }

    #[test]
    fn validation_guards_where_tokens_go() {
        let mut settings: AzureSettings = toml::from_str(TOML).unwrap();
        settings.cloud.resource_manager = "http://management.azure.com".into();
        assert_eq!(settings.validate().unwrap_err().key, "cloud.resource_manager");
        settings.cloud.resource_manager = "http://127.0.0.1:8080".into();
        settings.validate().unwrap();
        settings.cloud.authority_host = "http://127.0.0.1:8080".into();
        assert_eq!(settings.validate().unwrap_err().key, "cloud.authority_host");
        settings.cloud.authority_host = "https://login.microsoftonline.com".into();
        settings.cloud.batch_scope = "https://batch.core.windows.net/".into();
        assert_eq!(settings.validate().unwrap_err().key, "cloud.batch_scope");
        settings.cloud.batch_scope = CloudSettings::default().batch_scope;
        settings.api_versions.compute = "2024-07-01&x=1".into();
        assert_eq!(settings.validate().unwrap_err().key, "api_versions.compute");
        settings.api_versions.compute = "2024-07-01".into();
        settings.retry.max_attempts = 0;
        assert_eq!(settings.validate().unwrap_err().key, "retry.max_attempts");
    }
}
