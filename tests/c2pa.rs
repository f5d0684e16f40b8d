//! C2PA manifests (src/c2pa_sign.rs): signed into PNG, JPEG and WebP images, checked by the
//! reference tool `c2patool` and by `read_manifest`, intact and with one pixel-data byte
//! flipped. The certificates are made here: a private CA and an ECDSA P-256 signing
//! certificate it issued (C2PA validators reject self-signed signing certificates).
//!
//! End to end: `r2f generate --c2pa` with the `[c2pa]` key of a configuration file, the
//! configuration errors of `[c2pa]` (exit 78), and the worker signing the images of a job that
//! asks (`output.c2pa`; real RabbitMQ and Redis, an in-process S3) or rejecting it without a key.
//!
//! `c2patool` (installed by scripts/setup.sh): `R2F_C2PATOOL`, else
//! `$R2F_VENV/c2patool/bin/c2patool` (`R2F_VENV` defaults to `.venv`).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use r2f::c2pa_sign::{read_manifest, C2paSigner, PARAMETERS_LABEL, TRAINED_ALGORITHMIC_MEDIA};
use r2f::image::{encode_image, read_metadata, ImageFormat};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SignatureAlgorithm,
};
use serde_json::{json, Value};

use common::harness::{s3_setup, tiny_job, unique, Broker, WorkerProc};
use common::model_dir;

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

// End to end: the `r2f` binary with a `[c2pa]` key in its configuration file.

/// The `r2f` binary, nothing of the caller's environment configuring it.
fn r2f() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_r2f"));
    for (k, _) in std::env::vars() {
        if k.starts_with("R2F__") {
            c.env_remove(k);
        }
    }
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The `[c2pa]` lines of a configuration signing with `creds`.
fn key_lines(creds: &Credentials) -> String {
    format!(
        "key_file = \"{}\"\ncert_file = \"{}\"\n",
        creds.key.display(),
        creds.chain.display()
    )
}

/// A configuration file in `dir` whose `[c2pa]` section holds `c2pa`.
fn c2pa_config(dir: &Path, c2pa: &str) -> PathBuf {
    let path = dir.join(format!("{}.toml", unique("r2f")));
    let prefix = unique("c2pa");
    std::fs::write(
        &path,
        format!("[redis]\nkey_prefix = \"{prefix}\"\n[c2pa]\n{c2pa}"),
    )
    .unwrap();
    path
}

/// `r2f [--config CONFIG] generate` of "a frog" with the tiny SD3 model (one step, 64x48, on
/// the CPU) into `out`, with `extra` options.
fn generate(config: Option<&Path>, out: &Path, extra: &[&str]) -> Output {
    let mut cmd = r2f();
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    cmd.args(["generate", "--prompt", "a frog", "--device", "cpu"])
        .args(["--steps", "1", "--width", "64", "--height", "48"])
        .arg("--model")
        .arg(model_dir("sd3-tiny-a"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// What `r2f inspect` prints of `file`, less `ai_generated` (which it checks is true).
fn inspect(file: &Path) -> Value {
    let o = r2f().arg("inspect").arg(file).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mut record: Value = serde_json::from_slice(&o.stdout).unwrap();
    let marked = record.as_object_mut().unwrap().remove("ai_generated");
    assert_eq!(marked, Some(Value::Bool(true)), "{record}");
    record
}

/// `r2f generate --c2pa` in `format`: the image and r2f's metadata are those of the same run
/// unsigned, c2patool finds the manifest intact with the generation record `r2f inspect`
/// prints as its parameters, `--from` reads the record back, and one flipped pixel-data byte
/// breaks the data hash.
fn cli_signs(format: ImageFormat) {
    let creds = credentials(&rcgen::PKCS_ECDSA_P256_SHA256);
    let dir = tempfile::tempdir().unwrap();
    let config = c2pa_config(dir.path(), &key_lines(&creds));
    let (mime, ext) = (format.content_type(), format.extension());

    // A key configured, signing not asked for (sign_by_default is false): not signed.
    let plain_file = dir.path().join(format!("plain.{ext}"));
    let o = generate(Some(&config), &plain_file, &[]);
    assert_eq!(o.status.code(), Some(0), "{mime}: {}", stderr(&o));
    let plain = std::fs::read(&plain_file).unwrap();
    assert_eq!(read_manifest(&plain, mime).unwrap(), None, "{mime}");

    let file = dir.path().join(format!("signed.{ext}"));
    let o = generate(Some(&config), &file, &["--c2pa"]);
    assert_eq!(o.status.code(), Some(0), "{mime}: {}", stderr(&o));
    let signed = std::fs::read(&file).unwrap();
    assert_ne!(signed, plain, "{mime}: not signed");
    assert_eq!(
        read_metadata(&signed).unwrap(),
        read_metadata(&plain).unwrap(),
        "{mime}"
    );
    let record = inspect(&file);
    assert_eq!(record["prompt"], "a frog", "{record}");
    assert_eq!(record["width"], 64, "{record}");

    // c2patool: intact, only the untrusted signer; the parameters are the generation record.
    let report = c2patool_report(&file, None);
    let failures = failure_codes(&report);
    assert!(
        failures.iter().all(|c| c == UNTRUSTED),
        "{mime}: c2patool reports {failures:?}\n{report:#}"
    );
    assert_ne!(report["validation_state"], "Invalid", "{mime}: {report:#}");
    let manifest = active_manifest(&report);
    assert_eq!(manifest["title"], "a frog", "{manifest:#}");
    assert_eq!(manifest["claim_generator_info"][0]["name"], "r2f");
    let actions = &assertion(manifest, "c2pa.actions.v2")["actions"];
    assert_eq!(actions[0]["action"], "c2pa.created", "{actions}");
    assert_eq!(actions[0]["digitalSourceType"], TRAINED_ALGORITHMIC_MEDIA);
    assert_eq!(assertion(manifest, PARAMETERS_LABEL), &record, "{mime}");
    // Trusting the test CA: no failure at all.
    let trusted = c2patool_report(&file, Some(&creds.ca));
    assert_eq!(
        failure_codes(&trusted),
        BTreeSet::new(),
        "{mime}: {trusted:#}"
    );
    assert_eq!(trusted["validation_state"], "Trusted", "{mime}");

    // read_manifest agrees.
    let summary = read_manifest(&signed, mime).unwrap().expect("a manifest");
    assert!(summary.valid, "{mime}: {summary:?}");
    assert_eq!(summary.title.as_deref(), Some("a frog"));
    assert_eq!(
        summary.generator,
        Some(format!("r2f {}", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(summary.signed_by.as_deref(), Some("r2f tests"));
    assert_eq!(summary.parameters.as_ref(), Some(&record), "{mime}");

    // --from reads the record out of the signed image and makes the unsigned image again
    // (no --c2pa, no key configured).
    let again = dir.path().join(format!("again.{ext}"));
    let o = r2f()
        .args(["generate", "--from"])
        .arg(&file)
        .arg("--out")
        .arg(&again)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{mime}: {}", stderr(&o));
    let again = std::fs::read(&again).unwrap();
    assert!(again == plain, "{mime}: --from did not make the same bytes");
    assert_eq!(read_manifest(&again, mime).unwrap(), None, "{mime}");
    // With --c2pa: signed again, with the same record (a signature is new each time: the
    // bytes are not the first signed image's).
    let resigned = dir.path().join(format!("resigned.{ext}"));
    let o = r2f()
        .arg("--config")
        .arg(&config)
        .args(["generate", "--c2pa", "--from"])
        .arg(&file)
        .arg("--out")
        .arg(&resigned)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{mime}: {}", stderr(&o));
    let resigned = std::fs::read(&resigned).unwrap();
    let summary = read_manifest(&resigned, mime).unwrap().expect("a manifest");
    assert!(summary.valid, "{mime}: {summary:?}");
    assert_eq!(summary.parameters.as_ref(), Some(&record), "{mime}");
    assert_eq!(
        read_metadata(&resigned).unwrap(),
        read_metadata(&plain).unwrap(),
        "{mime}"
    );

    // One pixel-data byte flipped: c2patool reports the hash mismatch.
    let bad_file = dir.path().join(format!("tampered.{ext}"));
    std::fs::write(&bad_file, tampered(&signed, format)).unwrap();
    let report = c2patool_report(&bad_file, None);
    let failures = failure_codes(&report);
    assert!(
        failures.contains(DATA_HASH_MISMATCH),
        "{mime}: c2patool reports {failures:?}\n{report:#}"
    );
    assert_eq!(report["validation_state"], "Invalid", "{mime}");
}

#[test]
fn cli_generate_c2pa_signs_a_png() {
    cli_signs(ImageFormat::Png);
}

#[test]
fn cli_generate_c2pa_signs_a_jpeg() {
    cli_signs(ImageFormat::Jpeg);
}

#[test]
fn cli_generate_c2pa_signs_a_webp() {
    cli_signs(ImageFormat::Webp);
}

/// Without a key nothing is signed, and `--c2pa` is a configuration error; with
/// `sign_by_default`, every image is signed.
#[test]
fn cli_signs_by_default_only_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    // The default configuration: no key.
    let out = dir.path().join("plain.png");
    let o = generate(None, &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let plain = std::fs::read(&out).unwrap();
    assert_eq!(read_manifest(&plain, "image/png").unwrap(), None);
    let never = dir.path().join("never.png");
    let o = generate(None, &never, &["--c2pa"]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("c2pa.key_file"), "{}", stderr(&o));
    assert!(!never.exists());

    // sign_by_default: signed without --c2pa.
    let creds = credentials(&rcgen::PKCS_ECDSA_P256_SHA256);
    let config = c2pa_config(
        dir.path(),
        &format!("{}sign_by_default = true\n", key_lines(&creds)),
    );
    let out = dir.path().join("by-default.png");
    let o = generate(Some(&config), &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let signed = std::fs::read(&out).unwrap();
    let summary = read_manifest(&signed, "image/png")
        .unwrap()
        .expect("signed");
    assert!(summary.valid, "{summary:?}");
    assert_eq!(summary.parameters, Some(inspect(&out)));
}

/// An unusable `[c2pa]` section stops every command that loads the configuration with exit 78,
/// naming the setting.
#[test]
fn c2pa_configuration_errors_exit_78_naming_c2pa() {
    let creds = credentials(&rcgen::PKCS_ECDSA_P256_SHA256);
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.key");
    std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let (key, chain) = (creds.key.display(), creds.chain.display());
    let cases = [
        (
            "a key without its certificate",
            format!("key_file = \"{key}\"\n"),
            "c2pa.cert_file",
        ),
        (
            "a certificate without its key",
            format!("cert_file = \"{chain}\"\n"),
            "c2pa.key_file",
        ),
        (
            "a key that is not the certificate's",
            format!(
                "key_file = \"{}\"\ncert_file = \"{chain}\"\n",
                other.display()
            ),
            "does not match",
        ),
        (
            "sign_by_default without a key",
            "sign_by_default = true\n".to_string(),
            "c2pa.sign_by_default",
        ),
        (
            "a key file that is not there",
            format!(
                "key_file = \"{}\"\ncert_file = \"{chain}\"\n",
                dir.path().join("missing.key").display()
            ),
            "missing.key",
        ),
    ];
    for (what, c2pa, needle) in &cases {
        let config = c2pa_config(dir.path(), c2pa);
        let o = r2f()
            .arg("--config")
            .arg(&config)
            .args(["config", "check", "--no-probe"])
            .output()
            .unwrap();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(78), "{what}: {e}");
        assert!(e.contains("c2pa") && e.contains(needle), "{what}: {e}");
    }
    // The worker does not start either, nor does generate --c2pa; client commands on the same
    // configuration (a gateway's, say, without the key mounted) do not read the key.
    let config = c2pa_config(dir.path(), &cases[2].1);
    let o = r2f()
        .arg("--config")
        .arg(&config)
        .args(["schema", "job"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = r2f()
        .arg("--config")
        .arg(&config)
        .arg("worker")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not match"), "{}", stderr(&o));
    let out = dir.path().join("never.png");
    let o = generate(Some(&config), &out, &["--c2pa"]);
    assert_eq!(o.status.code(), Some(78), "{}", stderr(&o));
    assert!(!out.exists());

    // A usable pair passes.
    let config = c2pa_config(dir.path(), &key_lines(&creds));
    let o = r2f()
        .arg("--config")
        .arg(&config)
        .args(["config", "check", "--no-probe"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

// End to end: the worker (RabbitMQ and Redis on loopback, an in-process S3).

const T: Duration = Duration::from_secs(60);

/// A job for the tiny model with `output`.
fn job_with_output(id: &str, output: Value) -> Value {
    let mut job = tiny_job(id, 1);
    job["output"] = output;
    job
}

/// Checks the images of job `id` the worker stored (`n`, in `format`): each is signed (when
/// `signed`) with a valid manifest whose parameters are its `result.json` generation record,
/// or carries none. Returns the first image.
fn check_stored(
    s3: &common::harness::S3Server,
    job: &Value,
    format: ImageFormat,
    n: usize,
    signed: bool,
) -> Vec<u8> {
    let id = job["id"].as_str().unwrap();
    let prompt = job["prompt"].as_str().unwrap();
    let mime = format.content_type();
    let result: Value = serde_json::from_slice(&s3.read(&format!("out/{id}/result.json"))).unwrap();
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["outputs"].as_array().unwrap().len(), n, "{result}");
    let mut first = None;
    for i in 0..n {
        let bytes = s3.read(&format!("out/{id}/{i}.{}", format.extension()));
        let out = &result["outputs"][i];
        use sha2::Digest;
        assert_eq!(
            out["sha256"].as_str().unwrap(),
            hex::encode(sha2::Sha256::digest(&bytes)),
            "{id}/{i}: result.json's hash is of the stored (signed) bytes"
        );
        // r2f's own metadata is there, signed or not.
        let (fields, marked) = read_metadata(&bytes).unwrap();
        assert!(marked, "{id}/{i}");
        let in_image = r2f::generate::GenerationRecord::from_fields(&fields).unwrap();
        assert_eq!(serde_json::to_value(&in_image).unwrap(), out["metadata"]);
        let summary = read_manifest(&bytes, mime).unwrap();
        if !signed {
            assert_eq!(summary, None, "{id}/{i}: signed");
        } else {
            let summary = summary.unwrap_or_else(|| panic!("{id}/{i}: not signed"));
            assert!(summary.valid, "{id}/{i}: {summary:?}");
            assert!(
                summary.failures.iter().all(|f| f.code == UNTRUSTED),
                "{id}/{i}: {summary:?}"
            );
            assert_eq!(
                summary.generator,
                Some(format!("r2f {}", env!("CARGO_PKG_VERSION")))
            );
            assert_eq!(
                summary.digital_source_type.as_deref(),
                Some(TRAINED_ALGORITHMIC_MEDIA)
            );
            assert_eq!(summary.title, Some(format!("{prompt} ({i})")));
            let params = summary.parameters.expect("a parameters assertion");
            assert_eq!(params["prompt"], prompt, "{params}");
            assert_eq!(params, out["metadata"], "{id}/{i}");
        }
        first.get_or_insert(bytes);
    }
    first.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_key_signs_the_images_of_the_jobs_that_ask() {
    let creds = credentials(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (names, s3, mut cfg) = s3_setup("c2pa-sign").await;
    cfg.extra = format!("[c2pa]\n{}", key_lines(&creds));
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    assert!(
        worker.log().contains("C2PA signing enabled"),
        "{}",
        worker.log()
    );

    let png = job_with_output("signed", json!({"c2pa": true}));
    let mut webp = job_with_output("signed-webp", json!({"format": "webp", "c2pa": true}));
    webp["prompt"] = json!("a green frog");
    webp["params"]["num_images"] = json!(2);
    let plain = tiny_job("plain", 1);
    let said_no = job_with_output("said-no", json!({"c2pa": false}));
    for job in [&png, &webp, &plain, &said_no] {
        broker.publish(job).await;
    }
    let results = broker.wait_results(4, T).await;
    assert_eq!(
        results.len(),
        4,
        "{:?}\n{}",
        broker.events_seen,
        worker.log()
    );
    for r in &results {
        assert_eq!(r["status"], "succeeded", "{r}");
    }
    let signed = check_stored(&s3, &png, ImageFormat::Png, 1, true);
    check_stored(&s3, &webp, ImageFormat::Webp, 2, true);
    check_stored(&s3, &plain, ImageFormat::Png, 1, false);
    check_stored(&s3, &said_no, ImageFormat::Png, 1, false);

    // The reference tool agrees, and trusts the image with the test CA as its anchor.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("signed.png");
    std::fs::write(&file, &signed).unwrap();
    let report = c2patool_report(&file, None);
    let failures = failure_codes(&report);
    assert!(failures.iter().all(|c| c == UNTRUSTED), "{report:#}");
    let trusted = c2patool_report(&file, Some(&creds.ca));
    assert_eq!(trusted["validation_state"], "Trusted", "{trusted:#}");
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_signing_by_default_signs_every_job_but_those_that_say_no() {
    let creds = credentials(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (names, s3, mut cfg) = s3_setup("c2pa-default").await;
    cfg.extra = format!("[c2pa]\n{}sign_by_default = true\n", key_lines(&creds));
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let default = job_with_output("default", json!({"format": "jpeg"}));
    let said_no = job_with_output("said-no", json!({"c2pa": false}));
    broker.publish(&default).await;
    broker.publish(&said_no).await;
    let results = broker.wait_results(2, T).await;
    assert_eq!(
        results.len(),
        2,
        "{:?}\n{}",
        broker.events_seen,
        worker.log()
    );
    for r in &results {
        assert_eq!(r["status"], "succeeded", "{r}");
    }
    check_stored(&s3, &default, ImageFormat::Jpeg, 1, true);
    check_stored(&s3, &said_no, ImageFormat::Png, 1, false);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_a_key_rejects_the_jobs_that_ask_for_c2pa() {
    let (names, s3, cfg) = s3_setup("c2pa-nokey").await;
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    assert!(
        !worker.log().contains("C2PA signing enabled"),
        "{}",
        worker.log()
    );
    let asks = job_with_output("asks", json!({"c2pa": true}));
    let said_no = job_with_output("said-no", json!({"c2pa": false}));
    let plain = tiny_job("plain", 1);
    for job in [&asks, &said_no, &plain] {
        broker.publish(job).await;
    }
    let results = broker.wait_results(3, T).await;
    assert_eq!(
        results.len(),
        3,
        "{:?}\n{}",
        broker.events_seen,
        worker.log()
    );
    let result = |id: &str| results.iter().find(|r| r["id"] == id).unwrap();
    let r = result("asks");
    assert_eq!(r["status"], "rejected", "{r}");
    assert_eq!(r["error"]["kind"], "invalid_job", "{r}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("output.c2pa"), "{message}");
    assert_eq!(result("said-no")["status"], "succeeded");
    assert_eq!(result("plain")["status"], "succeeded");
    check_stored(&s3, &said_no, ImageFormat::Png, 1, false);
    check_stored(&s3, &plain, ImageFormat::Png, 1, false);
    assert!(
        !s3.keys().iter().any(|k| k.starts_with("out/asks/")),
        "{:?}",
        s3.keys()
    );

    // Dead-lettered like every rejection, with its reason; its status says rejected.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dead = broker.take_dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0["id"], "asks");
    assert!(dead[0].1.contains("output.c2pa"), "{dead:?}");
    assert_eq!(dead[0].2, "invalid_job");
    let status = common::harness::job_status(&names, "asks")
        .await
        .expect("a status record");
    let status = serde_json::to_value(status).unwrap();
    assert_eq!(status["state"], "rejected", "{status}");
    assert_eq!(broker.queue_len(&names.jobs).await, 0);
    broker.cleanup().await;
}
