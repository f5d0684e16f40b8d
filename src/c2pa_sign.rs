//! C2PA manifests (Content Credentials) signed into already-encoded images: PNG, JPEG and WebP
//! bytes in memory, with the `c2pa` crate (pure-Rust crypto, no network access).
//!
//! The manifest says the image was made by r2f with a trained model: claim generator
//! `r2f <version>`, the title, a `c2pa.actions` assertion with one `c2pa.created` action whose
//! digital source type is IPTC's `trainedAlgorithmicMedia`, and the generation record as the
//! custom assertion [`PARAMETERS_LABEL`]. No time-stamp authority is asked: the signature
//! carries no trusted time, so validators judge the certificate at validation time.
//!
//! Everything here is synchronous (no async runtime needed): the GPU thread calls
//! [`C2paSigner::sign`] directly.

use std::io::Cursor;
use std::path::Path;

use anyhow::{anyhow, bail, Context as _};
use c2pa::crypto::raw_signature::validator_for_signing_alg;
use c2pa::validation_results::ValidationState;
use c2pa::{BoxedSigner, Builder, Context, Reader, Settings, SigningAlg};
use serde::Serialize;
use serde_json::{json, Value};
use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_PKCS1_RSASSAPSS, OID_SIG_ED25519,
};
use x509_parser::pem::Pem;
use x509_parser::prelude::FromDer;

/// The label of the custom assertion holding the generation record.
pub const PARAMETERS_LABEL: &str = "org.r2f.parameters";

/// IPTC's digital source type of media made by a trained model.
pub const TRAINED_ALGORITHMIC_MEDIA: &str =
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

/// The MIME types [`C2paSigner::sign`] and [`read_manifest`] take.
pub const SUPPORTED_MIME_TYPES: [&str; 3] = ["image/png", "image/jpeg", "image/webp"];

/// The claim generator's name (`r2f`); its version is the crate's.
const GENERATOR: &str = env!("CARGO_PKG_NAME");

/// Extended key usages C2PA validators accept for a signing certificate (c2pa-rs's default
/// list, less time-stamping and OCSP signing, which are for other roles).
const SIGNING_EKUS: [(&str, &str); 4] = [
    ("1.3.6.1.5.5.7.3.4", "emailProtection"),
    ("1.3.6.1.5.5.7.3.36", "documentSigning"),
    ("1.3.6.1.4.1.62558.2.1", "C2PA signing"),
    ("1.3.6.1.4.1.311.76.59.1.9", "Microsoft C2PA signing"),
];

/// A C2PA signer made once at start-up from PEM files: a PKCS#8 private key and its
/// certificate chain, leaf first. The algorithm follows the leaf certificate's key: ES256,
/// ES384 or ES512 for an EC key on P-256, P-384 or P-521, PS256 for RSA, Ed25519.
pub struct C2paSigner {
    signer: BoxedSigner,
    alg: SigningAlg,
    subject: String,
}

impl std::fmt::Debug for C2paSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("C2paSigner")
            .field("alg", &self.alg)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl C2paSigner {
    /// Reads and checks the key and the certificate chain. Errors name the file and what is
    /// wrong: missing or unreadable, not PEM, a certificate C2PA validators reject (a CA or
    /// self-signed, no organization (O=) in its subject, not valid now, without the
    /// digitalSignature key usage or a signing extended key usage), an unsupported key
    /// algorithm, a key that is not PKCS#8 or does not match the leaf certificate. The daemon
    /// calls this at start-up and refuses to start on an error.
    pub fn from_pem_files(key: &Path, certs: &Path) -> anyhow::Result<Self> {
        let key_pem = std::fs::read(key)
            .with_context(|| format!("C2PA signing key {}: cannot read it", key.display()))?;
        let certs_pem = std::fs::read(certs).with_context(|| {
            format!("C2PA certificate chain {}: cannot read it", certs.display())
        })?;
        Self::from_pem(&key_pem, &certs_pem).map_err(|e| {
            anyhow!(
                "C2PA signer (key {}, certificates {}): {e:#}",
                key.display(),
                certs.display()
            )
        })
    }

    /// [`Self::from_pem_files`] from the files' contents.
    pub fn from_pem(key_pem: &[u8], certs_pem: &[u8]) -> anyhow::Result<Self> {
        let ders = certificate_ders(certs_pem)?;
        let (_, leaf) = X509Certificate::from_der(&ders[0])
            .map_err(|e| anyhow!("the first certificate does not parse: {e}"))?;
        let alg = signing_alg(&leaf)?;
        check_leaf(&leaf)?;
        let subject = leaf.subject().to_string();

        let key_label = pem_blocks(key_pem)
            .map_err(|e| anyhow!("the key file is not PEM: {e}"))?
            .into_iter()
            .next()
            .map(|p| p.label)
            .ok_or_else(|| anyhow!("the key file holds no PEM block"))?;
        match key_label.as_str() {
            "PRIVATE KEY" => {}
            "ENCRYPTED PRIVATE KEY" => bail!("the private key is encrypted; give it unencrypted (PKCS#8, `-----BEGIN PRIVATE KEY-----`)"),
            "EC PRIVATE KEY" | "RSA PRIVATE KEY" => bail!(
                "the private key is in the {key_label} format; convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8`"
            ),
            other => bail!("the key file's first PEM block is {other:?}, not a PKCS#8 private key"),
        }
        let signer =
            c2pa::create_signer::from_keys(certs_pem, key_pem, alg, None).map_err(|e| {
                anyhow!("the private key is not a usable {alg} key for the certificate: {e}")
            })?;

        // The key must be the leaf's: sign a probe and check it with the certificate's key.
        let probe = b"r2f C2PA signing key check";
        let signature = signer
            .sign(probe)
            .map_err(|e| anyhow!("the private key cannot sign: {e}"))?;
        let validator = validator_for_signing_alg(alg)
            .ok_or_else(|| anyhow!("no {alg} signature validator is built in"))?;
        if validator
            .validate(&signature, probe, leaf.public_key().raw)
            .is_err()
        {
            bail!(
                "the private key does not match the certificate {subject} (the first in the chain)"
            );
        }
        Ok(Self {
            signer,
            alg,
            subject,
        })
    }

    /// The signature algorithm, in C2PA's spelling (`es256`, `ps256`, `ed25519`, ...).
    pub fn algorithm(&self) -> String {
        self.alg.to_string()
    }

    /// The signing certificate's subject (for the start-up log).
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Signs a manifest into `image` (an encoded image of the MIME type `mime`: image/png,
    /// image/jpeg or image/webp) and returns the new bytes: claim generator `r2f <version>`,
    /// `title`, a `c2pa.created` action of digital source type [`TRAINED_ALGORITHMIC_MEDIA`]
    /// by r2f, and `parameters` (the generation record) as the [`PARAMETERS_LABEL`] assertion.
    /// Two signings of the same image differ (the manifest's label and instance id are random
    /// UUIDs).
    pub fn sign(
        &self,
        image: &[u8],
        mime: &str,
        title: &str,
        parameters: &Value,
    ) -> anyhow::Result<Vec<u8>> {
        check_mime(mime)?;
        let generator = json!({ "name": GENERATOR, "version": env!("CARGO_PKG_VERSION") });
        let mut builder = Builder::from_context(context()?)
            .with_definition(json!({
                "title": title,
                "format": mime,
                "claim_generator_info": [generator],
            }))
            .context("C2PA manifest definition")?;
        builder
            .add_action(json!({
                "action": "c2pa.created",
                "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": generator,
            }))
            .context("C2PA created action")?;
        builder
            .add_assertion(PARAMETERS_LABEL, parameters)
            .context("C2PA parameters assertion")?;
        let mut source = Cursor::new(image);
        let mut dest = Cursor::new(Vec::with_capacity(image.len() + 16 * 1024));
        builder
            .sign(&*self.signer, mime, &mut source, &mut dest)
            .with_context(|| format!("signing the C2PA manifest into the {mime} image"))?;
        Ok(dest.into_inner())
    }
}

/// A validation failure of a manifest: its C2PA status code (e.g. `assertion.dataHash.mismatch`,
/// `signingCredential.untrusted`) and the validator's explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ValidationFailure {
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explanation: Option<String>,
}

/// What [`read_manifest`] found in an image's active C2PA manifest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ManifestSummary {
    /// The manifest is intact: its signature checks and the image matches its hashes. A signer
    /// missing from the trust list (read_manifest uses none) does not make it invalid; it shows
    /// in `failures` as `signingCredential.untrusted`.
    pub valid: bool,
    /// Every failure the validation reported, `signingCredential.untrusted` included.
    pub failures: Vec<ValidationFailure>,
    pub title: Option<String>,
    /// The claim generator, `NAME VERSION` (`r2f 0.1.0`).
    pub generator: Option<String>,
    /// The `digitalSourceType` of the `c2pa.created` action.
    pub digital_source_type: Option<String>,
    /// The signer's organization: the signing certificate's subject O= (what c2pa calls the
    /// issuer).
    pub signed_by: Option<String>,
    /// The [`PARAMETERS_LABEL`] assertion.
    pub parameters: Option<Value>,
}

impl ManifestSummary {
    /// Whether `failures` holds this status code.
    pub fn has_failure(&self, code: &str) -> bool {
        self.failures.iter().any(|f| f.code == code)
    }
}

/// Reads and validates the C2PA manifest of an encoded image (MIME type `mime`): `None` when
/// the image carries none, an error when it carries one that cannot be read at all.
pub fn read_manifest(image: &[u8], mime: &str) -> anyhow::Result<Option<ManifestSummary>> {
    check_mime(mime)?;
    let reader = match Reader::from_context(context()?).with_stream(mime, Cursor::new(image)) {
        Ok(reader) => reader,
        Err(c2pa::Error::JumbfNotFound | c2pa::Error::ProvenanceMissing) => return Ok(None),
        Err(e) => {
            return Err(anyhow!(
                "reading the C2PA manifest of the {mime} image: {e}"
            ))
        }
    };
    let Some(manifest) = reader.active_manifest() else {
        return Ok(None);
    };

    let mut failures: Vec<ValidationFailure> = Vec::new();
    let mut add = |status: &c2pa::validation_status::ValidationStatus| {
        failures.push(ValidationFailure {
            code: status.code().to_string(),
            explanation: status.explanation().map(str::to_string),
        })
    };
    match reader.validation_results() {
        Some(results) => {
            results
                .active_manifest()
                .into_iter()
                .flat_map(|codes| codes.failure())
                .for_each(&mut add);
            results
                .ingredient_deltas()
                .into_iter()
                .flatten()
                .flat_map(|delta| delta.validation_deltas().failure())
                .for_each(&mut add);
        }
        None => reader
            .validation_status()
            .into_iter()
            .flatten()
            .filter(|s| !s.passed())
            .for_each(&mut add),
    }

    let generator = manifest
        .claim_generator_info
        .as_ref()
        .and_then(|infos| infos.first())
        .map(|info| match &info.version {
            Some(version) => format!("{} {version}", info.name),
            None => info.name.clone(),
        })
        .or_else(|| manifest.claim_generator().map(str::to_string));
    let mut digital_source_type = None;
    let mut parameters = None;
    for assertion in manifest.assertions() {
        let label = assertion.label();
        if label == PARAMETERS_LABEL {
            parameters = assertion.to_assertion::<Value>().ok();
        } else if label == "c2pa.actions" || label == "c2pa.actions.v2" {
            let actions = assertion.to_assertion::<Value>().unwrap_or(Value::Null);
            digital_source_type = actions["actions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["action"] == "c2pa.created")
                .and_then(|a| a["digitalSourceType"].as_str())
                .map(str::to_string)
                .or(digital_source_type);
        }
    }
    Ok(Some(ManifestSummary {
        valid: reader.validation_state() != ValidationState::Invalid,
        failures,
        title: manifest.title().map(str::to_string),
        generator,
        digital_source_type,
        signed_by: manifest.issuer(),
        parameters,
    }))
}

/// The c2pa context of one signing or reading: no thumbnails (not built in), nothing fetched.
fn context() -> anyhow::Result<Context> {
    let settings = Settings::new()
        .with_json(
            &json!({
                "builder": { "thumbnail": { "enabled": false } },
                "verify": { "remote_manifest_fetch": false, "ocsp_fetch": false },
            })
            .to_string(),
        )
        .context("C2PA settings")?;
    Context::new()
        .with_settings(settings)
        .context("C2PA settings")
}

fn check_mime(mime: &str) -> anyhow::Result<()> {
    if !SUPPORTED_MIME_TYPES.contains(&mime) {
        bail!(
            "C2PA manifests are supported in {}, not {mime:?}",
            SUPPORTED_MIME_TYPES.join(", ")
        );
    }
    Ok(())
}

/// The PEM blocks of a file.
fn pem_blocks(bytes: &[u8]) -> anyhow::Result<Vec<Pem>> {
    Pem::iter_from_buffer(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("{e}"))
}

/// The DER certificates of a PEM chain file: at least one, only `CERTIFICATE` blocks.
fn certificate_ders(pem: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let blocks = pem_blocks(pem).map_err(|e| anyhow!("the certificate file is not PEM: {e}"))?;
    if blocks.is_empty() {
        bail!("the certificate file holds no PEM certificate");
    }
    blocks
        .into_iter()
        .enumerate()
        .map(|(i, block)| {
            if block.label != "CERTIFICATE" {
                bail!(
                    "the certificate file's PEM block {} is {:?}, not CERTIFICATE",
                    i + 1,
                    block.label
                );
            }
            X509Certificate::from_der(&block.contents)
                .map_err(|e| anyhow!("certificate {} does not parse: {e}", i + 1))?;
            Ok(block.contents)
        })
        .collect()
}

/// The C2PA signature algorithm of a certificate's key.
fn signing_alg(cert: &X509Certificate) -> anyhow::Result<SigningAlg> {
    let spki = cert.public_key();
    let key_oid = &spki.algorithm.algorithm;
    if *key_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(|| anyhow!("the certificate's EC key names no curve"))?;
        if curve == OID_EC_P256 {
            Ok(SigningAlg::Es256)
        } else if curve == OID_NIST_EC_P384 {
            Ok(SigningAlg::Es384)
        } else if curve == OID_NIST_EC_P521 {
            Ok(SigningAlg::Es512)
        } else {
            bail!("the certificate's EC curve {curve} is not supported (P-256, P-384, P-521 are)")
        }
    } else if *key_oid == OID_PKCS1_RSAENCRYPTION || *key_oid == OID_PKCS1_RSASSAPSS {
        Ok(SigningAlg::Ps256)
    } else if *key_oid == OID_SIG_ED25519 {
        Ok(SigningAlg::Ed25519)
    } else {
        bail!("the certificate's key algorithm {key_oid} is not supported (EC P-256/P-384/P-521, RSA, Ed25519 are)")
    }
}

/// The checks C2PA validators make of a signing certificate that can fail at start-up rather
/// than in every manifest.
fn check_leaf(cert: &X509Certificate) -> anyhow::Result<()> {
    let subject = cert.subject();
    if cert.is_ca() {
        bail!("the first certificate ({subject}) is a CA; the chain must start with the signing (end-entity) certificate");
    }
    if cert.issuer() == cert.subject() {
        bail!("the signing certificate ({subject}) is self-signed, which C2PA validators reject; have it issued by a CA");
    }
    // c2pa-rs takes the signer's name from it and fails the claim signature without one.
    if cert.subject().iter_organization().next().is_none() {
        bail!("the signing certificate ({subject}) names no organization (O=), which C2PA validators require");
    }
    let validity = cert.validity();
    if !validity.is_valid() {
        bail!(
            "the signing certificate ({subject}) is not valid now (valid from {} to {})",
            validity.not_before,
            validity.not_after
        );
    }
    let digital_signature = cert
        .key_usage()
        .ok()
        .flatten()
        .is_some_and(|ku| ku.value.digital_signature());
    if !digital_signature {
        bail!("the signing certificate ({subject}) lacks the digitalSignature key usage");
    }
    let allowed = cert.extended_key_usage().ok().flatten().is_some_and(|eku| {
        eku.value.email_protection
            || eku.value.other.iter().any(|oid| {
                let oid = oid.to_id_string();
                SIGNING_EKUS.iter().any(|(s, _)| oid == *s)
            })
    });
    if !allowed {
        let names: Vec<_> = SIGNING_EKUS
            .iter()
            .map(|(oid, name)| format!("{name} ({oid})"))
            .collect();
        bail!(
            "the signing certificate ({subject}) has no extended key usage C2PA accepts for signing: one of {}",
            names.join(", ")
        );
    }
    Ok(())
}
