//! TLS everywhere, with a private CA generated here (rcgen): TLS-terminating proxies (rustls) in
//! front of the machine's RabbitMQ and Redis, the in-process S3 server and a stand-in LLM, each
//! serving a certificate for `localhost` / 127.0.0.1 signed by the CA. The worker reaches them
//! through `amqps://`, `rediss://` and `https://` with `tls.ca_file`; another CA is refused;
//! proxies that require a client certificate take the worker's `tls.cert_file` /
//! `tls.key_file` and refuse it without; and the private CA is trusted on top of the system
//! roots, never instead of them.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::harness::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(60);
/// How long a worker that cannot reach its broker is given to (wrongly) become ready.
const NOT_READY: Duration = Duration::from_secs(8);

/// A private certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate signed by a [`Ca`] and its key, as PEM.
struct Leaf {
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("r2f test CA {name}"));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Self {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A server certificate for `localhost` and 127.0.0.1, or a client certificate.
    fn leaf(&self, name: &str, client: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut p =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes the CA certificate to `dir/<name>.pem`.
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.pem()).unwrap();
        path
    }
}

impl Leaf {
    /// Writes `dir/<name>.crt` and `dir/<name>.key`.
    fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }
}

/// A TLS-terminating proxy: accepts TLS with a certificate of `server`'s CA (and, when asked,
/// only clients whose certificate `client_ca` signed), and forwards the plain bytes to `target`.
struct TlsProxy {
    addr: SocketAddr,
    /// Handshakes completed.
    accepted: Arc<AtomicUsize>,
    /// Handshakes completed with a client certificate.
    with_client_certificate: Arc<AtomicUsize>,
    /// Why the handshakes that failed failed.
    refused: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    async fn start(target: &str, server: &Ca, client_ca: Option<&Ca>) -> Self {
        Self::start_with(target, server, client_ca, false).await
    }

    /// With `optional`, a client certificate of `client_ca` is asked for but not required.
    async fn start_with(target: &str, server: &Ca, client_ca: Option<&Ca>, optional: bool) -> Self {
        let leaf = server.leaf("localhost", false);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.der()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                );
                let verifier = if optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                }
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let config = builder.with_single_cert(chain, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let with_client_certificate = Arc::new(AtomicUsize::new(0));
        let refused: Arc<Mutex<Vec<String>>> = Arc::default();
        let (ok, bad, target) = (accepted.clone(), refused.clone(), target.to_string());
        let certified = with_client_certificate.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, ok, bad, target, certified) = (
                    acceptor.clone(),
                    ok.clone(),
                    bad.clone(),
                    target.clone(),
                    certified.clone(),
                );
                tokio::spawn(async move {
                    match acceptor.accept(inbound).await {
                        Ok(mut tls) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            if tls.get_ref().1.peer_certificates().is_some() {
                                certified.fetch_add(1, Ordering::SeqCst);
                            }
                            if let Ok(mut out) = TcpStream::connect(&target).await {
                                let _ = tokio::io::copy_bidirectional(&mut tls, &mut out).await;
                            }
                        }
                        Err(e) => bad.lock().unwrap().push(e.to_string()),
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            with_client_certificate,
            refused,
            task,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn refused(&self) -> Vec<String> {
        self.refused.lock().unwrap().clone()
    }

    fn with_client_certificate(&self) -> usize {
        self.with_client_certificate.load(Ordering::SeqCst)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plain HTTP stand-in for the LLM's model list (`GET /v1/models`), for `r2f config check`.
async fn models_server() -> SocketAddr {
    let app = axum::Router::new().route(
        "/v1/models",
        axum::routing::get(|| async { axum::Json(serde_json::json!({"data": []})) }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// The broker, Redis and S3 of a worker, each behind its own TLS proxy.
struct Services {
    amqp: TlsProxy,
    redis: TlsProxy,
    s3: TlsProxy,
}

impl Services {
    async fn start(s3: &S3Server, server: &Ca, client_ca: Option<&Ca>) -> Self {
        Self {
            amqp: TlsProxy::start(AMQP_ADDR, server, client_ca).await,
            redis: TlsProxy::start("127.0.0.1:6379", server, client_ca).await,
            s3: TlsProxy::start(&s3.addr.to_string(), server, client_ca).await,
        }
    }

    /// Points `cfg` at the proxies: `amqps://`, `rediss://`, `https://`.
    fn configure(&self, cfg: &mut WorkerConfig) {
        cfg.amqp_url = format!("amqps://guest:guest@localhost:{}/%2f", self.amqp.port());
        cfg.redis_url = format!("rediss://localhost:{}", self.redis.port());
        cfg.s3_endpoint = Some(format!("https://localhost:{}", self.s3.port()));
    }

    fn refused(&self) -> Vec<String> {
        [&self.amqp, &self.redis, &self.s3]
            .iter()
            .flat_map(|p| p.refused())
            .collect()
    }
}

/// `[tls]` of a configuration file.
fn tls_section(ca: &Path, client: Option<&(PathBuf, PathBuf)>) -> String {
    let mut s = format!("[tls]\nca_file = {:?}\n", ca.to_str().unwrap());
    if let Some((cert, key)) = client {
        s.push_str(&format!(
            "cert_file = {:?}\nkey_file = {:?}\n",
            cert.to_str().unwrap(),
            key.to_str().unwrap()
        ));
    }
    s
}

/// Publishes one tiny job and waits for its result event.
async fn run_one_job(broker: &mut Broker, id: &str, worker: &WorkerProc) -> serde_json::Value {
    broker.publish(&tiny_job(id, 2)).await;
    let results = broker.wait_results(1, T).await;
    assert_eq!(
        results.len(),
        1,
        "events: {:?}\nlog: {}",
        broker.events_seen,
        worker.log()
    );
    results[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_runs_a_job_over_amqps_rediss_and_https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("A");
    let ca_file = ca.write(dir.path(), "ca");
    let (names, s3, mut cfg) = s3_setup("tls-ok").await;
    let services = Services::start(&s3, &ca, None).await;
    services.configure(&mut cfg);
    // The telemetry exporter too: spans go to an OTLP collector over https.
    let (collector, exports) = post_counter("/v1/traces").await;
    let otlp = TlsProxy::start(&collector.to_string(), &ca, None).await;
    cfg.extra = format!(
        "{}[telemetry]\notlp_endpoint = \"https://localhost:{}\"\n",
        tls_section(&ca_file, None),
        otlp.port()
    );
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "not ready: {}", worker.log());
    let r = run_one_job(&mut broker, "tls-1", &worker).await;
    assert_eq!(r["status"], "succeeded", "{r}\nlog: {}", worker.log());
    // The image went to S3 over https, the job's lock and status to Redis over rediss.
    assert!(
        s3.keys().iter().any(|k| k.ends_with("tls-1/0.png")),
        "{:?}",
        s3.keys()
    );
    let status = job_status(&names, "tls-1").await;
    assert!(status.is_some(), "no status record in Redis");
    for (name, p) in [
        ("amqp", &services.amqp),
        ("redis", &services.redis),
        ("s3", &services.s3),
    ] {
        assert!(p.accepted() > 0, "{name}: no TLS connection");
    }
    assert!(services.refused().is_empty(), "{:?}", services.refused());
    // The batch exporter sends within seconds.
    wait_count(&exports, T).await;
    assert!(
        exports.load(Ordering::SeqCst) > 0,
        "no spans exported: {}",
        worker.log()
    );
    assert!(otlp.accepted() > 0 && otlp.refused().is_empty());
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_of_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (Ca::new("A"), Ca::new("B"));
    let other_file = other.write(dir.path(), "other");
    let (names, s3, mut cfg) = s3_setup("tls-wrong-ca").await;
    let services = Services::start(&s3, &ca, None).await;
    services.configure(&mut cfg);
    cfg.extra = tls_section(&other_file, None);
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(
        !worker.wait_ready(NOT_READY).await,
        "ready with a broker of an untrusted CA: {}",
        worker.log()
    );
    let log = worker.log();
    assert!(
        log.contains("invalid peer certificate") && log.contains("UnknownIssuer"),
        "{log}"
    );
    assert_eq!(services.amqp.accepted(), 0);
    assert!(!services.amqp.refused().is_empty());
    drop(worker);
    let _ = names;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_takes_the_client_certificate_and_refuses_a_worker_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("A");
    let ca_file = ca.write(dir.path(), "ca");
    let client = ca.leaf("r2f-worker", true).write(dir.path(), "worker");
    let (names, s3, mut cfg) = s3_setup("tls-mutual").await;
    let services = Services::start(&s3, &ca, Some(&ca)).await;
    services.configure(&mut cfg);

    // Without a client certificate: refused at the handshake, never ready.
    cfg.extra = tls_section(&ca_file, None);
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(
        !worker.wait_ready(NOT_READY).await,
        "ready without a client certificate: {}",
        worker.log()
    );
    assert!(
        worker.log().to_lowercase().contains("certificate"),
        "{}",
        worker.log()
    );
    let refused = services.amqp.refused();
    assert!(
        refused
            .iter()
            .any(|e| e.contains("peer sent no certificates")),
        "{refused:?}"
    );
    drop(worker);

    // With it: a job end to end.
    cfg.metrics_port = free_port();
    cfg.extra = tls_section(&ca_file, Some(&client));
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "not ready: {}", worker.log());
    let r = run_one_job(&mut broker, "mtls-1", &worker).await;
    assert_eq!(r["status"], "succeeded", "{r}\nlog: {}", worker.log());
    assert!(s3.keys().iter().any(|k| k.ends_with("mtls-1/0.png")));
    assert!(job_status(&names, "mtls-1").await.is_some());
    for (name, p) in [
        ("amqp", &services.amqp),
        ("redis", &services.redis),
        ("s3", &services.s3),
    ] {
        assert!(p.accepted() > 0, "{name}: no TLS connection");
        assert_eq!(
            p.with_client_certificate(),
            p.accepted(),
            "{name}: a connection without the client certificate"
        );
    }
    broker.cleanup().await;
}

/// `r2f config check` with `file`, the S3 credentials and `env`: its stdout.
fn config_check(file: &Path, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_r2f"))
        .arg("--config")
        .arg(file)
        .args(["config", "check"])
        .env("AWS_ACCESS_KEY_ID", S3_KEY)
        .env("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The verdict line of `name` in `r2f config check`'s output.
fn verdict<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no {name} line: {out}"))
}

/// A configuration file for `r2f config check`: the worker's settings, `tls` (a `[tls]`
/// section or nothing) and an LLM on `llm_port`.
fn check_config(dir: &Path, cfg: &mut WorkerConfig, tls: &str, llm_port: u16) -> PathBuf {
    cfg.extra = format!(
        "{tls}[llm]\nenabled = true\nbase_url = \"https://localhost:{llm_port}/v1\"\napi_key_env = \"\"\n"
    );
    let path = dir.join(format!("check-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, cfg.toml()).unwrap();
    path
}

/// `tls.ca_file` adds to the system roots. CA B stands for the public roots: the child process
/// gets it as `SSL_CERT_FILE`, which the OS store (rustls-native-certs) reads in place of the
/// machine's bundle; `tls.ca_file` is CA A. Every client (LLM, broker, Redis, S3) reaches
/// servers of either CA in the same process. Before `service::tls`, `ca_file` was set as
/// `SSL_CERT_FILE` at start, replacing the roots: the servers of B (standing for S3 on AWS,
/// a public LLM) were then refused, and Redis ignored `ca_file` altogether.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_private_ca_is_added_to_the_system_roots_not_put_in_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Ca::new("A"), Ca::new("B"));
    let a_file = a.write(dir.path(), "a");
    let b_file = b.write(dir.path(), "b");
    let (_names, s3, mut cfg) = s3_setup("tls-additive").await;
    let models = models_server().await.to_string();
    let (llm_a, llm_b) = (
        TlsProxy::start(&models, &a, None).await,
        TlsProxy::start(&models, &b, None).await,
    );
    let (on_a, on_b) = (
        Services::start(&s3, &a, None).await,
        Services::start(&s3, &b, None).await,
    );
    let tls = tls_section(&a_file, None);
    let system = [("SSL_CERT_FILE", b_file.to_str().unwrap())];
    // The LLM on a "system" root, the rest on the private CA; then the other way round.
    for (services, llm) in [(&on_a, &llm_b), (&on_b, &llm_a)] {
        services.configure(&mut cfg);
        let file = check_config(dir.path(), &mut cfg, &tls, llm.port());
        let (code, out, err) = config_check(&file, &system);
        for name in ["broker", "redis", "storage", "llm"] {
            assert!(
                verdict(&out, name).starts_with("ok"),
                "{name}: {out}\n{err}"
            );
        }
        assert_eq!(code, Some(0), "{out}\n{err}");
        assert!(llm.accepted() > 0);
    }

    // Without the private CA, its servers are refused (the check means something).
    on_a.configure(&mut cfg);
    let file = check_config(dir.path(), &mut cfg, "", llm_a.port());
    let (code, out, err) = config_check(&file, &system);
    assert_eq!(code, Some(69), "{out}\n{err}");
    for name in ["broker", "redis", "storage", "llm"] {
        assert!(
            verdict(&out, name).starts_with("FAIL"),
            "{name}: {out}\n{err}"
        );
    }
}

/// Mutual TLS for the clients `r2f config check` probes, the LLM included: every one presents
/// the client certificate, and every one is refused without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_presents_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("A");
    let ca_file = ca.write(dir.path(), "ca");
    let client = ca.leaf("r2f-worker", true).write(dir.path(), "worker");
    let (_names, s3, mut cfg) = s3_setup("tls-mutual-check").await;
    let models = models_server().await.to_string();
    let llm = TlsProxy::start(&models, &ca, Some(&ca)).await;
    let services = Services::start(&s3, &ca, Some(&ca)).await;
    services.configure(&mut cfg);
    for (client, want, code_want) in [(Some(&client), "ok", 0), (None, "FAIL", 69)] {
        let tls = tls_section(&ca_file, client);
        let file = check_config(dir.path(), &mut cfg, &tls, llm.port());
        let (code, out, err) = config_check(&file, &[]);
        for name in ["broker", "redis", "storage", "llm"] {
            assert!(
                verdict(&out, name).starts_with(want),
                "{name}: {out}\n{err}"
            );
        }
        assert_eq!(code, Some(code_want), "{out}\n{err}");
    }
}

/// The trust in-process: the system roots (well over a hundred: the OS store and the Mozilla
/// bundle) plus the private CA, and an HTTPS client built from it reaches a server of that CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_holds_the_system_roots_plus_the_private_ca() {
    use r2f::config::TlsSettings;
    use r2f::service::tls::Tls;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("A");
    let ca_file = ca.write(dir.path(), "ca");
    let none = TlsSettings {
        ca_file: String::new(),
        cert_file: String::new(),
        key_file: String::new(),
    };
    let with_ca = TlsSettings {
        ca_file: ca_file.to_str().unwrap().into(),
        ..none.clone()
    };
    let system = Tls::from_settings(&none).unwrap();
    let tls = Tls::from_settings(&with_ca).unwrap();
    assert!(system.root_count() > 100, "{}", system.root_count());
    assert_eq!(tls.root_count(), system.root_count() + 1);
    assert!(tls.trusts_root(ca.der().as_ref()) && !system.trusts_root(ca.der().as_ref()));
    assert!(!tls.has_client_certificate());

    let models = models_server().await.to_string();
    let server = TlsProxy::start(&models, &ca, None).await;
    let url = format!("https://localhost:{}/v1/models", server.port());
    let client = tls.http(reqwest::Client::builder()).build().unwrap();
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let without = system.http(reqwest::Client::builder()).build().unwrap();
    let e = without.get(&url).send().await.unwrap_err();
    assert!(format!("{e:?}").contains("UnknownIssuer"), "{e:?}");

    // A certificate and a key that do not belong together are refused at start.
    let (cert, _) = ca.leaf("one", true).write(dir.path(), "one");
    let (_, key) = ca.leaf("two", true).write(dir.path(), "two");
    let mismatched = TlsSettings {
        cert_file: cert.to_str().unwrap().into(),
        key_file: key.to_str().unwrap().into(),
        ..with_ca.clone()
    };
    let e = Tls::from_settings(&mismatched).unwrap_err().to_string();
    assert!(e.starts_with("invalid configuration: tls.cert_file"), "{e}");
}

/// Waits until `count` is above zero, `timeout` at most.
async fn wait_count(count: &AtomicUsize, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while count.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain HTTP server that counts the POSTs to `path` (a webhook receiver, an OTLP collector).
async fn post_counter(path: &str) -> (SocketAddr, Arc<AtomicUsize>) {
    let posts = Arc::new(AtomicUsize::new(0));
    let counted = posts.clone();
    let app = axum::Router::new().route(
        path,
        axum::routing::post(move || {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                "ok"
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, posts)
}

/// Webhooks go to third parties: they trust `tls.ca_file` like every client, but never present
/// the client certificate, even to a receiver that asks for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_trust_the_private_ca_without_presenting_the_client_certificate() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("A");
    let ca_file = ca.write(dir.path(), "ca");
    let client = ca.leaf("r2f-worker", true).write(dir.path(), "worker");
    let (hook, posts) = post_counter("/hook").await;
    let receiver = TlsProxy::start_with(&hook.to_string(), &ca, Some(&ca), true).await;
    let names = Names::new(&unique("tls-hook"));
    let secret = dir.path().join("whsec");
    std::fs::write(
        &secret,
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 24])
        ),
    )
    .unwrap();
    let mut cfg = WorkerConfig::new(&names);
    cfg.local_dir = Some(dir.path().join("storage"));
    cfg.extra = format!(
        "{}[tenancy]\nmode = \"multi\"\n[tenants.acme]\nusers = [\"guest\"]\n\
         webhook_secret_files = [{:?}]\nwebhook_allowed_hosts = [\"localhost\"]\n\
         webhook_allowed_ports = [{}]\nwebhook_allowed_networks = [\"127.0.0.0/8\", \"::1/128\"]\n\
         [webhook]\nretry_min_ms = 300\ntimeout_secs = 2\n",
        tls_section(&ca_file, Some(&client)),
        secret.to_str().unwrap(),
        receiver.port()
    );
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "not ready: {}", worker.log());
    let mut job = tiny_job("hook-1", 2);
    job["output"] = serde_json::json!({"webhook": {
        "url": format!("https://localhost:{}/hook", receiver.port())
    }});
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_user_id("guest".into());
    let confirm = broker
        .ch
        .basic_publish(
            names.route.as_str().into(),
            "tiny".into(),
            lapin::options::BasicPublishOptions::default(),
            job.to_string().as_bytes(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let results = broker.wait_results(1, T).await;
    assert_eq!(results.len(), 1, "{}", worker.log());
    assert_eq!(results[0]["status"], "succeeded", "{}", results[0]);
    wait_count(&posts, T).await;
    assert!(
        posts.load(Ordering::SeqCst) > 0,
        "no delivery: {}",
        worker.log()
    );
    assert!(receiver.accepted() > 0);
    assert_eq!(
        receiver.with_client_certificate(),
        0,
        "a webhook presented the client certificate"
    );
    assert!(receiver.refused().is_empty(), "{:?}", receiver.refused());
    broker.cleanup().await;
}
