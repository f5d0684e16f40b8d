//! One trust configuration for every TLS client of the process, built once at start from
//! `[tls]`: the system roots (the OS store through rustls-native-certs, which `SSL_CERT_FILE` /
//! `SSL_CERT_DIR` may point elsewhere, and the Mozilla bundle of webpki-root-certs) **plus** the
//! certificates of `tls.ca_file`, and the client certificate of `tls.cert_file` /
//! `tls.key_file` when set.
//!
//! Each client library takes it in its own shape:
//! - HTTP (the LLM, `r2f config check`, S3 through [`crate::service::storage`], the OTLP
//!   exporter): a rustls `ClientConfig` given to reqwest ([`Tls::http`], [`Tls::client_config`]); webhooks get the same roots without the
//!   client certificate ([`Tls::http_anonymous`]), as they go to third parties;
//! - the broker (lapin, [`Tls::amqp`]): the Mozilla bundle and `ca_file` as extra roots of its
//!   platform verifier, which loads the OS store itself, and the identity as PEM;
//! - Redis ([`Tls::redis`]): its `root_cert` *replaces* the roots, so it gets every root of the
//!   store as one PEM bundle, and the identity as PEM.

use std::sync::{Arc, OnceLock};

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use crate::config::{ClientIdentity, TlsSettings};

/// The process's TLS configuration (see the module documentation).
pub struct Tls {
    /// Every root, as certificates: the OS store's, the Mozilla bundle's, then `ca_file`'s.
    roots: Vec<CertificateDer<'static>>,
    /// The Mozilla bundle and `ca_file` (what the broker's verifier adds to the OS store).
    extra: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
    identity: Option<ClientIdentity>,
    /// Roots and the client certificate (when set).
    client: Arc<ClientConfig>,
    /// Roots only.
    anonymous: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("roots", &self.roots.len())
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

static INSTALLED: OnceLock<Tls> = OnceLock::new();

/// The crypto provider of every rustls configuration of the process, installed as the default
/// too: rustls has two compiled in here (aws-lc-rs and ring, through different dependencies),
/// and a library that asks for the default (redis-rs) would find none otherwise.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// Builds the TLS configuration of `[tls]` and makes it the process's: every client built
/// afterwards uses it. Called once at start, before any client is built: a configuration that
/// is already in place (a client built earlier took the system roots alone) is an error.
pub fn install(s: &TlsSettings) -> anyhow::Result<&'static Tls> {
    let tls = Tls::from_settings(s)?;
    INSTALLED
        .set(tls)
        .map_err(|_| anyhow::anyhow!("the TLS configuration was built before [tls] was read"))?;
    Ok(get())
}

/// The process's TLS configuration: the installed one, else the system roots alone (library
/// use and tests that install none).
pub fn get() -> &'static Tls {
    INSTALLED.get_or_init(|| {
        Tls::from_settings(&TlsSettings {
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
        })
        .expect("the system roots alone always make a TLS configuration")
    })
}

/// Certificates as one PEM bundle.
fn pem_bundle<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'static>>) -> String {
    use base64::Engine;
    let mut out = String::new();
    for c in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// The certificates webpki can take as trust anchors (others are skipped, as every rustls
/// client skips them from the OS store: a bundle with one odd certificate must not stop Redis).
fn anchors(certs: Vec<CertificateDer<'static>>) -> (Vec<CertificateDer<'static>>, usize) {
    let total = certs.len();
    let ok: Vec<_> = certs
        .into_iter()
        .filter(|c| RootCertStore::empty().add(c.clone()).is_ok())
        .collect();
    let skipped = total - ok.len();
    (ok, skipped)
}

impl Tls {
    /// The configuration of `s`: the system roots, `ca_file`'s certificates, the client
    /// certificate. Fails on unreadable files, a `ca_file` certificate that is not a CA
    /// certificate webpki can use, or a key that does not match its certificate.
    pub fn from_settings(s: &TlsSettings) -> anyhow::Result<Self> {
        let files = s
            .read()
            .map_err(|m| anyhow::anyhow!("invalid configuration: {m}"))?;
        let native = rustls_native_certs::load_native_certs();
        for e in &native.errors {
            tracing::warn!(error = %e, "a system CA certificate could not be loaded");
        }
        let (native, skipped) = anchors(native.certs);
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "system CA certificates skipped (not usable as roots)"
            );
        }
        let mozilla: Vec<CertificateDer<'static>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        let (mozilla, _) = anchors(mozilla);
        let mut ca = Vec::new();
        for (i, c) in files.ca.into_iter().enumerate() {
            RootCertStore::empty().add(c.clone()).map_err(|e| {
                anyhow::anyhow!(
                    "invalid configuration: tls.ca_file {}: certificate {} is not usable as a root: {e}",
                    s.ca_file,
                    i + 1
                )
            })?;
            ca.push(c);
        }
        let extra: Vec<_> = mozilla.into_iter().chain(ca).collect();
        let roots: Vec<_> = native.into_iter().chain(extra.iter().cloned()).collect();
        let mut store = RootCertStore::empty();
        store.add_parsable_certificates(roots.iter().cloned());
        let store = Arc::new(store);

        let provider = provider();
        let builder = || {
            ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map(|b| b.with_root_certificates(store.clone()))
        };
        let mut anonymous = builder()?.with_no_client_auth();
        let mut client = match &files.client {
            None => anonymous.clone(),
            Some(id) => builder()?
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .map_err(|e| {
                    anyhow::anyhow!(
                        "invalid configuration: tls.cert_file {} and tls.key_file {}: {e}",
                        s.cert_file,
                        s.key_file
                    )
                })?,
        };
        // reqwest speaks HTTP/1.1 here (no http2 feature); say so in the handshake.
        for c in [&mut anonymous, &mut client] {
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
        }
        Ok(Self {
            roots,
            extra,
            store,
            identity: files.client,
            client: Arc::new(client),
            anonymous: Arc::new(anonymous),
        })
    }

    /// How many roots are trusted (the system's and `ca_file`'s).
    pub fn root_count(&self) -> usize {
        self.store.len()
    }

    /// Whether `cert` (DER) is one of the trusted roots.
    pub fn trusts_root(&self, cert: &[u8]) -> bool {
        self.roots.iter().any(|c| c.as_ref() == cert)
    }

    /// Whether a client certificate is configured.
    pub fn has_client_certificate(&self) -> bool {
        self.identity.is_some()
    }

    /// The rustls configuration with the client certificate (when set).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// An HTTP client builder that trusts the roots and presents the client certificate (when
    /// set): the LLM, S3, the configuration check.
    pub fn http(&self, b: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        b.use_preconfigured_tls((*self.client).clone())
    }

    /// An HTTP client builder that trusts the roots and presents no client certificate:
    /// webhooks, which go to third parties.
    pub fn http_anonymous(&self, b: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        b.use_preconfigured_tls((*self.anonymous).clone())
    }

    /// The broker's TLS configuration: lapin's platform verifier loads the OS store and adds
    /// these roots (the Mozilla bundle and `ca_file`).
    pub fn amqp(&self) -> lapin::tcp::OwnedTLSConfig {
        lapin::tcp::OwnedTLSConfig {
            identity: self
                .identity
                .as_ref()
                .map(|id| lapin::tcp::OwnedIdentity::PKCS8 {
                    pem: id.cert_pem.clone(),
                    key: id.key_pem.clone(),
                }),
            cert_chain: Some(pem_bundle(&self.extra)),
        }
    }

    /// Redis's TLS certificates: every root as one PEM bundle (redis-rs replaces its roots with
    /// `root_cert`), and the client certificate.
    pub fn redis(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self.identity.as_ref().map(|id| redis::ClientTlsConfig {
                client_cert: id.cert_pem.clone(),
                client_key: id.key_pem.clone(),
            }),
            root_cert: Some(pem_bundle(&self.roots).into_bytes()),
        }
    }
}
