//! Unit tests of `config.rs` (kept apart so that the module reads top to bottom).

use super::*;

#[test]
fn urls_with_passwords_are_redacted() {
    assert_eq!(
        redact_url("amqp://user:s3cret@broker:5672/%2f"),
        "amqp://user:***@broker:5672/%2f"
    );
    assert_eq!(
        redact_url("redis://127.0.0.1:6379"),
        "redis://127.0.0.1:6379"
    );
    let t = redact_text("cannot connect to amqps://u:hunter2@h/v: refused");
    assert!(!t.contains("hunter2") && t.contains("u:***@h/v"), "{t}");
}

#[test]
fn defaults_load_and_validate() {
    let s = Settings::load(None).unwrap();
    assert_eq!(s.worker.prefetch, 1);
    assert_eq!(s.amqp.queue_of("sd3"), "r2f.jobs.sd3");
    assert_eq!(s.amqp.inbox_queue, "r2f.jobs");
    assert!(s.models.contains_key("sd3"));
}

#[test]
fn closed_sets_name_their_values() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, want) in [
        (
            "[storage]\nbackend = \"gcs\"\n",
            "unknown storage backend `gcs` (expected local or s3)",
        ),
        (
            "[log]\nformat = \"xml\"\n",
            "unknown log format `xml` (expected text or json)",
        ),
        (
            "[llm]\nbackend = \"gemini\"\n",
            "unknown llm backend `gemini` (expected openai or llama)",
        ),
        (
            "[worker]\ndtype = \"fp8\"\n",
            "fp32, fp16 or bf16), or auto",
        ),
        (
            "[worker]\ndevice = \"tpu\"\n",
            "cpu, cuda or cuda:N), or auto",
        ),
    ] {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let e = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[worker]\ndevice = \"cuda:1\"\ndtype = \"auto\"\n").unwrap();
    let s = Settings::load(Some(&path)).unwrap();
    assert_eq!(s.worker.device, OrAuto::Given(DeviceSpec::Cuda(1)));
    assert_eq!(s.worker.dtype, OrAuto::Auto);
    assert_eq!(s.storage.backend, StorageBackend::Local);
}

#[test]
fn plan_limit_defaults() {
    let s = Settings::load(None).unwrap();
    assert_eq!(s.limits.max_plan_prompts, 16);
    assert_eq!(s.limits.max_plan_prompt_chars, 2000);
    assert_eq!(s.limits.max_plan_objects, 8);
}

#[test]
fn tls_files_are_read_and_parsed_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (cert, key, junk) = (
        write("c.pem", &cert.pem()),
        write("k.pem", &key.serialize_pem()),
        write("junk.pem", "not a certificate\n"),
    );
    let missing = dir.path().join("absent.pem").to_str().unwrap().to_string();
    for (tls, want) in [
        (
            format!("ca_file = {missing:?}"),
            format!("invalid configuration: tls.ca_file {missing} cannot be read"),
        ),
        (
            format!("ca_file = {junk:?}"),
            format!("invalid configuration: tls.ca_file {junk} holds no PEM certificate"),
        ),
        (
            format!("cert_file = {cert:?}"),
            "invalid configuration: tls.cert_file is set without tls.key_file".to_string(),
        ),
        (
            format!("key_file = {key:?}"),
            "invalid configuration: tls.key_file is set without tls.cert_file".to_string(),
        ),
        (
            format!("cert_file = {key:?}\nkey_file = {key:?}"),
            format!("invalid configuration: tls.cert_file {key} holds no PEM certificate"),
        ),
        (
            format!("cert_file = {cert:?}\nkey_file = {cert:?}"),
            format!("invalid configuration: tls.key_file {cert} holds no PEM private key"),
        ),
    ] {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, format!("[tls]\n{tls}\n")).unwrap();
        let e = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(e.starts_with(&want), "{tls}: {e}");
    }
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!("[tls]\nca_file = {cert:?}\ncert_file = {cert:?}\nkey_file = {key:?}\n"),
    )
    .unwrap();
    let files = Settings::load(Some(&path)).unwrap().tls.read().unwrap();
    assert_eq!(files.ca.len(), 1);
    let client = files.client.unwrap();
    assert_eq!(client.chain, files.ca);
    assert!(client.key_pem.starts_with(b"-----BEGIN PRIVATE KEY-----"));
}
