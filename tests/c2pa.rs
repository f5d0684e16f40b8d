//! C2PA manifests (src/c2pa_sign.rs): signed into PNG, JPEG and WebP images, checked by the
//! reference tool `c2patool` and by `read_manifest`, intact and with one pixel-data byte
//! flipped. The certificates are made here: a private CA and an ECDSA P-256 signing
//! certificate it issued (C2PA validators reject self-signed signing certificates).
//!
//! `c2patool` (installed by scripts/setup.sh): `R2F_C2PATOOL`, else
//! `$R2F_VENV/c2patool/bin/c2patool` (`R2F_VENV` defaults to `.venv`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use r2f::c2pa_sign::{read_manifest, C2paSigner, PARAMETERS_LABEL, TRAINED_ALGORITHMIC_MEDIA};
use r2f::image::{encode_image, read_metadata, ImageFormat};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SignatureAlgorithm,
};
use serde_json::{json, Value};

/// The failure a validator reports for a signer missing from its trust list: expected, the
/// test CA is on none.
const UNTRUSTED: &str = "signingCredential.untrusted";
/// The failure of an image whose bytes no longer match the manifest's hash.
const DATA_HASH_MISMATCH: &str = "assertion.dataHash.mismatch";

fn c2patool() -> PathBuf {
    let path = std::env::var_os("R2F_C2PATOOL").map_or_else(
        || {
            std::env::var_os("R2F_VENV")
                .map_or_else(
                    || Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"),
                    PathBuf::from,
                )
                .join("c2patool/bin/c2patool")
        },
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "c2patool not found at {} (scripts/setup.sh installs it; or set R2F_C2PATOOL)",
        path.display()
    );
    path
}

/// A private CA and a signing certificate it issued, as PEM files in `dir`.
struct Credentials {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    key: PathBuf,
    /// The signing certificate, then the CA's.
    chain: PathBuf,
}

fn ca() -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "r2f test C2PA CA");
    p.distinguished_name
        .push(DnType::OrganizationName, "r2f tests");
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A C2PA signing certificate: digitalSignature, emailProtection, not a CA, issued by `ca`.
fn signing_cert(
    ca: &CertifiedIssuer<'static, KeyPair>,
    alg: &'static SignatureAlgorithm,
) -> (String, KeyPair) {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, "r2f test signer");
    p.distinguished_name
        .push(DnType::OrganizationName, "r2f tests");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
    p.use_authority_key_identifier_extension = true;
    (p.signed_by(&key, ca).unwrap().pem(), key)
}

fn credentials(alg: &'static SignatureAlgorithm) -> Credentials {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca();
    let (leaf, key) = signing_cert(&ca, alg);
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    Credentials {
        ca: write("ca.pem", ca.pem()),
        key: write("signer.key", key.serialize_pem()),
        chain: write("chain.pem", format!("{leaf}{}", ca.pem())),
        _dir: dir,
    }
}

/// A 64x48 gradient in `format`, with r2f's usual metadata.
fn image(format: ImageFormat) -> Vec<u8> {
    let (h, w) = (48usize, 64usize);
    let mut rgb = Vec::with_capacity(h * w * 3);
    for y in 0..h {
        for x in 0..w {
            rgb.extend_from_slice(&[(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8]);
        }
    }
    let t = tch::Tensor::from_slice(&rgb).view([h as i64, w as i64, 3]);
    let fields = [("prompt", "a c2pa test".to_string()), ("seed", "7".into())];
    encode_image(&t, &fields, format, 90).unwrap()
}

fn parameters() -> Value {
    json!({ "prompt": "a c2pa test", "seed": 7, "steps": 4, "guidance": 7.5, "model": "sd3" })
}

/// The byte range of the first chunk/segment holding pixel data in a signed image: PNG's first
/// IDAT data, WebP's `VP8 ` data, JPEG's entropy-coded data after the first SOS header.
fn pixel_data(bytes: &[u8], format: ImageFormat) -> std::ops::Range<usize> {
    let find = |tag: &[u8]| {
        bytes
            .windows(tag.len())
            .position(|w| w == tag)
            .unwrap_or_else(|| panic!("no {:?} in the image", String::from_utf8_lossy(tag)))
    };
    match format {
        ImageFormat::Png => {
            let at = find(b"IDAT");
            let len = u32::from_be_bytes(bytes[at - 4..at].try_into().unwrap()) as usize;
            at + 4..at + 4 + len
        }
        ImageFormat::Webp => {
            let at = find(b"VP8 ");
            let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            at + 8..at + 8 + len
        }
        ImageFormat::Jpeg => {
            let at = find(&[0xff, 0xda]);
            let header = u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize;
            let end = bytes.len() - 2;
            assert_eq!(&bytes[end..], &[0xff, 0xd9], "the JPEG ends with EOI");
            at + 2 + header..end
        }
    }
}

/// `bytes` with one pixel-data byte flipped (in JPEG, one that cannot become or break a
/// marker).
fn tampered(bytes: &[u8], format: ImageFormat) -> Vec<u8> {
    let range = pixel_data(bytes, format);
    assert!(range.len() > 16, "pixel data {range:?}");
    let mut at = range.start + range.len() / 2;
    while format == ImageFormat::Jpeg && (bytes[at] >= 0xfe || bytes[at - 1] == 0xff) {
        at += 1;
    }
    let mut out = bytes.to_vec();
    out[at] ^= 0x01;
    out
}

/// c2patool's report on an image file, from a settings path with nothing beside it (no user
/// configuration, no trust lists), optionally trusting `anchors`.
fn c2patool_report(file: &Path, anchors: Option<&Path>) -> Value {
    let settings = file.with_file_name("no-c2pa-settings.toml");
    let mut cmd = Command::new(c2patool());
    cmd.arg("--settings").arg(&settings).arg(file);
    if let Some(anchors) = anchors {
        cmd.arg("trust").arg("--trust_anchors").arg(anchors);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "c2patool {}: {}\n{stdout}\n{}",
        file.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("c2patool's report ({e}): {stdout}"))
}

/// Every failure code in a c2patool report: the legacy `validation_status` list and the
/// `validation_results` of the active manifest and of any ingredient.
fn failure_codes(report: &Value) -> BTreeSet<String> {
    let mut codes = BTreeSet::new();
    let mut add = |list: &Value| {
        for status in list.as_array().into_iter().flatten() {
            codes.insert(status["code"].as_str().unwrap().to_string());
        }
    };
    add(&report["validation_status"]);
    let results = &report["validation_results"];
    add(&results["activeManifest"]["failure"]);
    for delta in results["ingredientDeltas"].as_array().into_iter().flatten() {
        add(&delta["validationDeltas"]["failure"]);
    }
    codes
}

fn active_manifest(report: &Value) -> &Value {
    let label = report["active_manifest"]
        .as_str()
        .expect("an active manifest");
    &report["manifests"][label]
}

fn assertion<'a>(manifest: &'a Value, label: &str) -> &'a Value {
    manifest["assertions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["label"] == label)
        .map(|a| &a["data"])
        .unwrap_or_else(|| panic!("no {label} assertion in {manifest:#}"))
}

fn signed_image_checks(format: ImageFormat) {
    let creds = credentials(&rcgen::PKCS_ECDSA_P256_SHA256);
    let signer = C2paSigner::from_pem_files(&creds.key, &creds.chain).unwrap();
    assert_eq!(signer.algorithm(), "es256");
    let mime = format.content_type();
    let plain = image(format);
    assert_eq!(
        read_manifest(&plain, mime).unwrap(),
        None,
        "{mime}: no manifest yet"
    );

    let signed = signer
        .sign(&plain, mime, "c2pa test image", &parameters())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("signed.{}", format.extension()));
    std::fs::write(&file, &signed).unwrap();

    // The reference tool: intact, only the (expected) untrusted signer, the created action and
    // the parameters.
    let report = c2patool_report(&file, None);
    let failures = failure_codes(&report);
    assert!(
        failures.iter().all(|c| c == UNTRUSTED),
        "{mime}: c2patool reports {failures:?}\n{report:#}"
    );
    assert_ne!(report["validation_state"], "Invalid", "{mime}: {report:#}");
    let manifest = active_manifest(&report);
    assert_eq!(manifest["title"], "c2pa test image");
    assert_eq!(
        manifest["claim_generator_info"][0]["name"], "r2f",
        "{manifest:#}"
    );
    assert_eq!(
        manifest["claim_generator_info"][0]["version"],
        env!("CARGO_PKG_VERSION")
    );
    let actions = assertion(manifest, "c2pa.actions.v2")["actions"]
        .as_array()
        .unwrap();
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(actions[0]["action"], "c2pa.created");
    assert_eq!(actions[0]["digitalSourceType"], TRAINED_ALGORITHMIC_MEDIA);
    assert_eq!(actions[0]["softwareAgent"]["name"], "r2f");
    assert_eq!(assertion(manifest, PARAMETERS_LABEL), &parameters());

    // Trusting the test CA: no failure at all.
    let trusted = c2patool_report(&file, Some(&creds.ca));
    assert_eq!(
        failure_codes(&trusted),
        BTreeSet::new(),
        "{mime}: {trusted:#}"
    );
    assert_eq!(trusted["validation_state"], "Trusted", "{mime}");

    // The pixels and r2f's own metadata (PNG text, XMP) are as they were.
    assert_eq!(
        read_metadata(&signed).unwrap(),
        read_metadata(&plain).unwrap()
    );

    // read_manifest agrees.
    let summary = read_manifest(&signed, mime).unwrap().expect("a manifest");
    assert!(summary.valid, "{mime}: {summary:?}");
    let codes: Vec<_> = summary.failures.iter().map(|f| f.code.as_str()).collect();
    assert!(codes.iter().all(|c| *c == UNTRUSTED), "{mime}: {codes:?}");
    assert_eq!(summary.title.as_deref(), Some("c2pa test image"));
    assert_eq!(
        summary.generator,
        Some(format!("r2f {}", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(
        summary.digital_source_type.as_deref(),
        Some(TRAINED_ALGORITHMIC_MEDIA)
    );
    assert_eq!(summary.parameters, Some(parameters()));

    // One pixel-data byte flipped: the hash no longer matches.
    let bad = tampered(&signed, format);
    let bad_file = dir.path().join(format!("tampered.{}", format.extension()));
    std::fs::write(&bad_file, &bad).unwrap();
    let report = c2patool_report(&bad_file, None);
    let failures = failure_codes(&report);
    assert!(
        failures.contains(DATA_HASH_MISMATCH),
        "{mime}: c2patool reports {failures:?}\n{report:#}"
    );
    assert_eq!(report["validation_state"], "Invalid", "{mime}");
    let summary = read_manifest(&bad, mime).unwrap().expect("a manifest");
    assert!(!summary.valid, "{mime}: {summary:?}");
    assert!(
        summary.has_failure(DATA_HASH_MISMATCH),
        "{mime}: {summary:?}"
    );
}

#[test]
fn png_signed_and_tampered() {
    signed_image_checks(ImageFormat::Png);
}

#[test]
fn jpeg_signed_and_tampered() {
    signed_image_checks(ImageFormat::Jpeg);
}

#[test]
fn webp_signed_and_tampered() {
    signed_image_checks(ImageFormat::Webp);
}

/// The algorithm follows the certificate's key.
#[test]
fn other_key_algorithms_sign_valid_manifests() {
    for (alg, name) in [
        (&rcgen::PKCS_ECDSA_P384_SHA384, "es384"),
        (&rcgen::PKCS_ED25519, "ed25519"),
    ] {
        let creds = credentials(alg);
        let signer = C2paSigner::from_pem_files(&creds.key, &creds.chain).unwrap();
        assert_eq!(signer.algorithm(), name);
        let signed = signer
            .sign(&image(ImageFormat::Png), "image/png", "t", &json!({}))
            .unwrap();
        let summary = read_manifest(&signed, "image/png").unwrap().unwrap();
        assert!(summary.valid, "{name}: {summary:?}");
    }
}

#[test]
fn signer_is_shareable_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<C2paSigner>();
}

#[test]
fn unsupported_format_is_refused() {
    let creds = credentials(&rcgen::PKCS_ECDSA_P256_SHA256);
    let signer = C2paSigner::from_pem_files(&creds.key, &creds.chain).unwrap();
    let err = signer
        .sign(b"GIF89a", "image/gif", "t", &json!({}))
        .unwrap_err();
    assert!(format!("{err:#}").contains("image/gif"), "{err:#}");
}

/// Start-up errors name the file and what is wrong.
#[test]
fn bad_credentials_are_refused_clearly() {
    let creds = credentials(&rcgen::PKCS_ECDSA_P256_SHA256);
    let dir = creds.key.parent().unwrap().to_path_buf();
    let message = |key: &Path, chain: &Path| {
        format!(
            "{:#}",
            C2paSigner::from_pem_files(key, chain).expect_err("an error")
        )
    };

    let missing = dir.join("missing.key");
    let m = message(&missing, &creds.chain);
    assert!(
        m.contains("missing.key") && m.contains("cannot read"),
        "{m}"
    );
    let m = message(&creds.key, &dir.join("missing.pem"));
    assert!(
        m.contains("missing.pem") && m.contains("cannot read"),
        "{m}"
    );

    // A key of the same kind that is not the certificate's.
    let other = dir.join("other.key");
    std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let m = message(&other, &creds.chain);
    assert!(
        m.contains("does not match") && m.contains("other.key"),
        "{m}"
    );

    // The CA's own certificate first: not a signing certificate.
    let ca_first = dir.join("ca-first.pem");
    std::fs::write(&ca_first, std::fs::read(&creds.ca).unwrap()).unwrap();
    let m = message(&creds.key, &ca_first);
    assert!(m.contains("is a CA") && m.contains("ca-first.pem"), "{m}");

    // The files swapped.
    let m = message(&creds.chain, &creds.key);
    assert!(m.contains("not CERTIFICATE"), "{m}");

    // A self-signed signing certificate.
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "self");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
    let self_signed = dir.join("self.pem");
    std::fs::write(&self_signed, p.self_signed(&key).unwrap().pem()).unwrap();
    let self_key = dir.join("self.key");
    std::fs::write(&self_key, key.serialize_pem()).unwrap();
    let m = message(&self_key, &self_signed);
    assert!(m.contains("self-signed"), "{m}");

    // A signing certificate without an organization: c2pa-rs fails its claim signature.
    let ca = ca();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "no org");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
    p.use_authority_key_identifier_extension = true;
    let no_org = dir.join("no-org.pem");
    std::fs::write(&no_org, p.signed_by(&key, &ca).unwrap().pem()).unwrap();
    let no_org_key = dir.join("no-org.key");
    std::fs::write(&no_org_key, key.serialize_pem()).unwrap();
    let m = message(&no_org_key, &no_org);
    assert!(m.contains("organization"), "{m}");
}
