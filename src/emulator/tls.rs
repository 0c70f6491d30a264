//! The emulator's TLS identity: a private CA made at start and a leaf certificate for 127.0.0.1 and
//! localhost signed by it. Clients trust the CA's PEM (`ca_cert` in the start-up line); Azure SDK
//! credentials refuse an authority host that is not https, so plain HTTP is opt-in only.
//!
//! With a state directory the files are kept and reused, so clients that trusted the CA before a
//! restart still trust the emulator after it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub struct TlsIdentity {
    pub ca_cert_path: PathBuf,
    pub server_config: Arc<rustls::ServerConfig>,
}

const CA_FILE: &str = "emulator-ca.pem";
const CERT_FILE: &str = "emulator-cert.pem";
const KEY_FILE: &str = "emulator-key.pem";

/// Loads the identity kept in `dir`, or makes a new one there.
pub fn load_or_create(dir: &Path) -> anyhow::Result<TlsIdentity> {
    let (ca, cert, key) = (dir.join(CA_FILE), dir.join(CERT_FILE), dir.join(KEY_FILE));
    if !(ca.exists() && cert.exists() && key.exists()) {
        create(dir)?;
    }
    let chain = vec![
        CertificateDer::from_pem_file(&cert)?,
        CertificateDer::from_pem_file(&ca)?,
    ];
    let key = PrivateKeyDer::from_pem_file(&key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsIdentity {
        ca_cert_path: ca,
        server_config: Arc::new(config),
    })
}

fn create(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sigrun emulator CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut leaf_params = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    leaf_params.distinguished_name.push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate()?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;

    write_private(&dir.join(KEY_FILE), &leaf_key.serialize_pem())?;
    std::fs::write(dir.join(CERT_FILE), leaf.pem())?;
    std::fs::write(dir.join(CA_FILE), ca.pem())?;
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(path)?.write_all(contents.as_bytes())
}
