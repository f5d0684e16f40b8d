//! The HTTP door (`r2f gateway`) on the real RabbitMQ, Redis and an in-process S3, with a
//! tiny-model worker: a job submitted over HTTP is followed over Server-Sent Events (its own
//! events only, in order, progress increasing), fetched through its presigned URL, answered
//! again for a retried POST, cancelled over HTTP, kept from another tenant's key, and a tenant
//! past its rate or its open jobs gets 429 with Retry-After; the OpenAPI document passes a
//! standard validator and the HTTP examples run against the gateway; one trace runs from the
//! client's `traceparent` through the gateway and the worker to an in-process OTLP receiver;
//! a draining gateway fails `/readyz` and ends its streams.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use common::harness::*;

const T: Duration = Duration::from_secs(120);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn amqp_url(user: &str, password: &str) -> String {
    format!("amqp://{user}:{password}@127.0.0.1:5672/%2f")
}

/// A key and the file of its digest (made with `r2f key`, as an operator would).
fn make_key(dir: &std::path::Path, name: &str) -> (String, PathBuf) {
    let out = Command::new(env!("CARGO_BIN_EXE_r2f"))
        .arg("key")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    let (key, digest) = (lines.next().unwrap(), lines.next().unwrap());
    let file = dir.join(format!("{name}.keys"));
    std::fs::write(&file, format!("# {name}\n{digest}\n")).unwrap();
    (key.to_string(), file)
}

/// A gateway process on its own port (its HTTP endpoints at `metrics_port`).
async fn start_gateway(cfg: &WorkerConfig) -> WorkerProc {
    let gw = WorkerProc::spawn_as(cfg, "gateway");
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        if let Some((200, _)) = gw.http("/readyz").await {
            return gw;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gateway not ready:\n{}", gw.log());
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    fn new(port: u16) -> Self {
        Self {
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        (
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(
        &self,
        key: &str,
        path: &str,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .json(body);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        self.send(req).await
    }

    async fn get(&self, key: &str, path: &str) -> (u16, reqwest::header::HeaderMap, Value) {
        self.send(
            self.http
                .get(format!("{}{path}", self.base))
                .bearer_auth(key),
        )
        .await
    }

    /// The events of a job's stream until the terminal one: (id, name, data).
    async fn events(
        &self,
        key: &str,
        id: &str,
        last: Option<&str>,
    ) -> Vec<(String, String, Value)> {
        let mut req = self
            .http
            .get(format!("{}/v1/jobs/{id}/events", self.base))
            .bearer_auth(key);
        if let Some(l) = last {
            req = req.header("last-event-id", l);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let mut body = r.bytes_stream();
        let (mut buf, mut out) = (String::new(), Vec::new());
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let chunk = tokio::time::timeout_at(deadline, body.next())
                .await
                .expect("the stream ends with the terminal event");
            let Some(chunk) = chunk else { break };
            buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut eid, mut name, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        eid = v.trim().into();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().into();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !name.is_empty() {
                    out.push((eid, name, serde_json::from_str(&data).unwrap()));
                }
            }
        }
        out
    }

    /// Polls the job's status until `done` says so.
    async fn wait_status(&self, key: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + T;
        loop {
            let (code, _, v) = self.get(key, &format!("/v1/jobs/{id}")).await;
            if code == 200 && done(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "job {id}: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn job(steps: u32) -> Value {
    json!({
        "prompt": "a hairy frog warrior",
        "model": "tiny",
        "mode": "plain",
        "params": {"steps": steps, "guidance": 5.0, "width": 64, "height": 48, "seed": 7}
    })
}

/// The order of an event id (`0.0`, `<attempt>.<step>`, `end`).
fn order(id: &str) -> (u32, u32) {
    if id == "end" {
        return (u32::MAX, u32::MAX);
    }
    let (a, n) = id.split_once('.').unwrap();
    (a.parse().unwrap(), n.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_http_is_followed_fetched_retried_cancelled_and_kept_from_other_tenants() {
    let (names, s3, mut cfg) = s3_setup("gw").await;
    let p = names.prefix.clone();
    let (wu, gu, au, bu) = (
        format!("{p}-w"),
        format!("{p}-g"),
        format!("{p}-a"),
        format!("{p}-b"),
    );
    // Workers and the gateway publish with a tenant's user_id: they impersonate.
    broker_user(&wu, "pw-w", &["impersonator"]);
    broker_user(&gu, "pw-g", &["impersonator"]);
    let dir = tempfile::tempdir().unwrap();
    let (key_a, file_a) = make_key(dir.path(), "a");
    let (key_b, file_b) = make_key(dir.path(), "b");
    let gw_port = free_port();
    cfg.amqp_url = amqp_url(&wu, "pw-w");
    cfg.worker_extra = "cancel_poll_ms = 100".into();
    cfg.storage_extra = "presign_ttl_secs = 600".into();
    cfg.extra = format!(
        "[limits]\nmax_steps = 1000000\n\
         [tenancy]\nmode = \"multi\"\n\
         [tenants.a]\nusers = [\"{au}\"]\napi_key_files = [{file_a:?}]\n\
         [tenants.b]\nusers = [\"{bu}\"]\napi_key_files = [{file_b:?}]\nrate_per_sec = 2.0\nburst = 10\nmax_jobs_open = 1\n\
         [gateway]\nlisten = \"127.0.0.1:{gw_port}\"\nrate_per_sec = 1000.0\nburst = 1000\ndrain_secs = 5\n"
    );
    let broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let mut gcfg = cfg_clone(&cfg);
    gcfg.amqp_url = amqp_url(&gu, "pw-g");
    gcfg.metrics_port = gw_port;
    let gw = start_gateway(&gcfg).await;
    let api = Api::new(gw_port);

    // No key, a wrong key: 401 with a Bearer challenge.
    let (code, h, body) = api
        .send(api.http.post(format!("{}/v1/jobs", api.base)).json(&job(2)))
        .await;
    assert_eq!(code, 401, "{body}");
    assert!(h["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    assert_eq!(api.post("r2f_wrong", "/v1/jobs", &job(2), &[]).await.0, 401);
    // A job a worker would reject is refused here, with the validator's reason.
    let mut bad = job(2);
    bad["params"]["steps"] = json!(0);
    let (code, _, body) = api.post(&key_a, "/v1/jobs", &bad, &[]).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_job");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("steps"),
        "{body}"
    );

    // Submit (the gateway makes the id), then follow the job over SSE.
    let (code, h, accepted) = api
        .post(&key_a, "/v1/jobs", &job(60), &[("idempotency-key", "k-1")])
        .await;
    assert_eq!(code, 202, "{accepted}\n{}", gw.log());
    let id = accepted["id"].as_str().unwrap().to_string();
    assert_eq!(h["location"].to_str().unwrap(), format!("/v1/jobs/{id}"));
    assert_eq!(accepted["state"], "queued");
    assert_eq!(accepted["events_url"], format!("/v1/jobs/{id}/events"));
    let events = api.events(&key_a, &id, None).await;
    let names_seen: Vec<&str> = events.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(names_seen.first(), Some(&"queued"), "{names_seen:?}");
    assert_eq!(names_seen.last(), Some(&"succeeded"), "{names_seen:?}");
    assert!(names_seen.contains(&"started"), "{names_seen:?}");
    assert!(
        names_seen.iter().filter(|n| **n == "progress").count() >= 2,
        "{names_seen:?}\n{}",
        worker.log()
    );
    // Only this job's events, ids strictly increasing, progress steps increasing.
    let mut last = None;
    let mut last_step = 0;
    for (eid, name, data) in &events {
        assert_eq!(data["id"], id.as_str(), "{data}");
        assert_eq!(data["tenant"], "a", "{data}");
        let o = order(eid);
        assert!(last.is_none_or(|l| o > l), "{eid} after {last:?}");
        last = Some(o);
        if name == "progress" {
            let step = data["step"].as_u64().unwrap();
            assert!(step > last_step, "{data}");
            last_step = step;
            assert_eq!(data["steps"], 60);
        }
    }
    let result = &events.last().unwrap().2;
    assert_eq!(result["status"], "succeeded");
    // The image through its presigned URL, as the result names it.
    let out = &result["outputs"][0];
    let url = out["url"].as_str().expect("a presigned URL");
    let bytes = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&bytes)),
        out["sha256"].as_str().unwrap()
    );
    assert!(bytes.starts_with(b"\x89PNG"));
    let (code, _, st) = api.get(&key_a, &format!("/v1/jobs/{id}")).await;
    assert_eq!(code, 200);
    assert_eq!(st["state"], "succeeded");
    let states: Vec<&str> = st["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["queued", "running", "succeeded"]);
    // Resuming after the last progress gives the terminal event only.
    let before_end = &events[events.len() - 2].0;
    let resumed = api.events(&key_a, &id, Some(before_end)).await;
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0].1, "succeeded");

    // A retried POST with the same Idempotency-Key answers the same job; another body under
    // it is refused.
    let (code, h, again) = api
        .post(&key_a, "/v1/jobs", &job(60), &[("idempotency-key", "k-1")])
        .await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["id"], id.as_str());
    assert_eq!(again["state"], "succeeded");
    assert_eq!(h["idempotent-replayed"], "true");
    let (code, _, body) = api
        .post(&key_a, "/v1/jobs", &job(61), &[("idempotency-key", "k-1")])
        .await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"]["code"], "idempotency_mismatch");

    // Another tenant's key: the job does not exist for it.
    for (code, what) in [
        (api.get(&key_b, &format!("/v1/jobs/{id}")).await.0, "status"),
        (
            api.post(&key_b, &format!("/v1/jobs/{id}/cancel"), &json!({}), &[])
                .await
                .0,
            "cancel",
        ),
    ] {
        assert_eq!(code, 404, "{what}");
    }
    let r = api
        .http
        .get(format!("{}/v1/jobs/{id}/events", api.base))
        .bearer_auth(&key_b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // Cancel a long job over HTTP once it runs: it ends `cancelled`.
    let (code, _, long) = api.post(&key_a, "/v1/jobs", &job(1_000_000), &[]).await;
    assert_eq!(code, 202, "{long}");
    let long_id = long["id"].as_str().unwrap().to_string();
    // Running, with its step, steps and (from the second progress on) an estimate.
    let running = api
        .wait_status(&key_a, &long_id, |v| {
            v["state"] == "running" && v["step"].as_u64().unwrap_or(0) > 1
        })
        .await;
    assert_eq!(running["steps"], 1_000_000);
    assert!(running["eta_ms"].as_u64().unwrap() > 0, "{running}");
    assert_eq!(
        api.post(
            &key_b,
            &format!("/v1/jobs/{long_id}/cancel"),
            &json!({}),
            &[]
        )
        .await
        .0,
        404
    );
    let (code, _, answer) = api
        .post(
            &key_a,
            &format!("/v1/jobs/{long_id}/cancel"),
            &json!({}),
            &[],
        )
        .await;
    assert_eq!(code, 200);
    assert_eq!(answer["cancel"], "requested", "{answer}");
    let events = api.events(&key_a, &long_id, Some("1.0")).await;
    let (_, name, data) = events.last().unwrap();
    assert_eq!(name, "cancelled", "{events:?}");
    assert_eq!(data["error"]["kind"], "cancelled");
    assert!(events
        .iter()
        .all(|(_, n, _)| n != "queued" && n != "started"));

    // Tenant b: one job open at most.
    let (code, _, first) = api.post(&key_b, "/v1/jobs", &job(1_000_000), &[]).await;
    assert_eq!(code, 202, "{first}");
    let (code, h, body) = api.post(&key_b, "/v1/jobs", &job(2), &[]).await;
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["error"]["code"], "too_many_open_jobs");
    assert!(h.contains_key("retry-after"));
    let b_id = first["id"].as_str().unwrap().to_string();
    let (code, _, _) = api
        .post(&key_b, &format!("/v1/jobs/{b_id}/cancel"), &json!({}), &[])
        .await;
    assert_eq!(code, 200);
    // Its rate: 2 a second past a burst of 10.
    let mut limited = None;
    for _ in 0..20 {
        let (code, h, body) = api.get(&key_b, &format!("/v1/jobs/{b_id}")).await;
        if code == 429 {
            limited = Some((h, body));
            break;
        }
    }
    let (h, body) = limited.expect("429 past the rate");
    assert_eq!(body["error"]["code"], "rate_limited");
    let wait: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    // Tenant a is not slowed down by b.
    assert_eq!(api.get(&key_a, &format!("/v1/jobs/{id}")).await.0, 200);

    // The gateway's metrics count by route, code and tenant.
    let (_, metrics) = gw.http("/metrics").await.unwrap();
    assert!(metrics
        .lines()
        .any(|l| l.starts_with("r2f_gateway_requests_total{code=\"202\",method=\"POST\",route=\"/v1/jobs\",tenant=\"a\"}")),
        "{metrics}");
    assert!(metrics
        .lines()
        .any(|l| l.contains("code=\"429\"") && l.contains("tenant=\"b\"")));
    // Every gateway metric the dashboard and the alert rules use is exported.
    let exported = exported_names(&metrics);
    let mut used = BTreeSet::new();
    for file in ["dashboards/r2f.json", "dashboards/alerts.yml"] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        used.extend(
            metric_names_in(&text)
                .into_iter()
                .filter(|n| n.starts_with("r2f_gateway_")),
        );
    }
    assert!(used.len() >= 3, "{used:?}");
    for name in &used {
        assert!(
            exported.contains(name),
            "{name} (used by dashboards/rules) is not exported"
        );
    }
    drop(gw);
    drop(worker);
    broker.cleanup().await;
    drop(s3);
}

fn cfg_clone(c: &WorkerConfig) -> WorkerConfig {
    let mut n = WorkerConfig::new(&c.names);
    n.amqp_url = c.amqp_url.clone();
    n.s3_endpoint = c.s3_endpoint.clone();
    n.bucket = c.bucket.clone();
    n.local_dir = c.local_dir.clone();
    n.metrics_port = c.metrics_port;
    n.worker_extra = c.worker_extra.clone();
    n.extra = c.extra.clone();
    n.storage_extra = c.storage_extra.clone();
    n.env = c.env.clone();
    n
}

/// A single-tenant fleet with one key: a worker and a gateway.
async fn single_tenant(
    name: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> (
    S3Server,
    Broker,
    WorkerProc,
    WorkerProc,
    String,
    u16,
    tempfile::TempDir,
) {
    let (names, s3, mut cfg) = s3_setup(name).await;
    let dir = tempfile::tempdir().unwrap();
    let (key, file) = make_key(dir.path(), "k");
    let gw_port = free_port();
    cfg.worker_extra = "cancel_poll_ms = 100".into();
    cfg.storage_extra = "presign_ttl_secs = 600".into();
    cfg.extra = format!(
        "[limits]\nmax_steps = 1000000\n[gateway]\nlisten = \"127.0.0.1:{gw_port}\"\napi_key_files = [{file:?}]\ndrain_secs = 3\n{extra}"
    );
    cfg.env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let mut gcfg = cfg_clone(&cfg);
    gcfg.metrics_port = gw_port;
    let gw = start_gateway(&gcfg).await;
    (s3, broker, worker, gw, key, gw_port, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_and_the_http_examples_run_against_the_gateway() {
    let (s3, broker, worker, gw, key, port, dir) = single_tenant("gwex", "", &[]).await;
    // The served document (this fleet's limits and models) passes a standard validator.
    let (code, doc) = gw.http("/openapi.json").await.unwrap();
    assert_eq!(code, 200);
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &doc).unwrap();
    let py = common::venv_python();
    assert!(py.exists(), "no {} (run scripts/setup.sh)", py.display());
    let out = Command::new(&py)
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(v["openapi"], "3.1.0");
    assert!(
        v["components"]["schemas"]["Job"]["properties"]["model"]["enum"]
            .as_array()
            .unwrap()
            .contains(&json!("tiny"))
    );
    // The examples' types are the committed document's.
    let out = Command::new(&py)
        .arg(root().join("scripts/openapi_types.py"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let url = format!("http://127.0.0.1:{port}");
    let images = tempfile::tempdir().unwrap();
    let tsx = root().join("examples/typescript/node_modules/.bin/tsx");
    assert!(tsx.exists(), "no {} (run scripts/setup.sh)", tsx.display());
    type MakeCommand<'a> = Box<dyn Fn(&[&str]) -> Command + 'a>;
    let clients: Vec<(&str, MakeCommand)> = vec![
        (
            "python",
            Box::new(|args: &[&str]| {
                let mut c = Command::new(&py);
                c.arg(root().join("examples/python/http_client.py"))
                    .args(args);
                c
            }),
        ),
        (
            "typescript",
            Box::new(|args: &[&str]| {
                let mut c = Command::new(&tsx);
                c.arg(root().join("examples/typescript/http-client.ts"))
                    .args(args);
                c
            }),
        ),
    ];
    for (name, make) in &clients {
        let base: Vec<&str> = vec![
            "--url",
            &url,
            "--key",
            &key,
            "--prompt",
            "a hairy frog warrior",
            "--model",
            "tiny",
            "--width",
            "64",
            "--height",
            "48",
            "--timeout",
            "120",
        ];
        // Submit, follow, fetch the image through its presigned URL.
        let mut args = base.clone();
        args.extend(["--steps", "30", "--out", images.path().to_str().unwrap()]);
        let mut cmd = make(&args);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{name}:\n{text}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            gw.log()
        );
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let kinds: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.get("event").and_then(Value::as_str))
            .collect();
        assert_eq!(kinds.first(), Some(&"queued"), "{name}: {kinds:?}");
        assert!(kinds.contains(&"progress"), "{name}: {kinds:?}");
        let image = lines
            .iter()
            .find_map(|l| l.get("matches"))
            .expect("an image line");
        assert_eq!(image, true, "{name}: {text}");
        // Cancel at the first progress event: exit 1, `cancelled`.
        let mut args = base.clone();
        args.extend(["--steps", "1000000", "--cancel-after-progress"]);
        let mut cmd = make(&args);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(out.status.code(), Some(1), "{name}: {text}");
        let result = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|l| l.get("result").cloned())
            .expect("a result line");
        assert_eq!(result["status"], "cancelled", "{name}: {text}");
    }
    drop(gw);
    drop(worker);
    broker.cleanup().await;
    drop(s3);
}

/// An OTLP/HTTP JSON receiver: every span received, with its service.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, String, String)>>>,
}

impl Receiver {
    async fn start(&self) -> u16 {
        let spans = self.spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let spans = spans.clone();
                async move {
                    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let mut got = spans.lock().unwrap();
                    for rs in v["resourceSpans"].as_array().cloned().unwrap_or_default() {
                        let service = rs["resource"]["attributes"]
                            .as_array()
                            .and_then(|a| {
                                a.iter().find(|x| x["key"] == "service.name").map(|x| {
                                    x["value"]["stringValue"].as_str().unwrap_or("").to_string()
                                })
                            })
                            .unwrap_or_default();
                        for ss in rs["scopeSpans"].as_array().cloned().unwrap_or_default() {
                            for s in ss["spans"].as_array().cloned().unwrap_or_default() {
                                got.push((
                                    service.clone(),
                                    hex_id(s["traceId"].as_str().unwrap_or("")),
                                    s["name"].as_str().unwrap_or("").to_string(),
                                ));
                            }
                        }
                    }
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        port
    }

    fn names(&self, service: &str, trace: &str) -> BTreeSet<String> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, t, _)| s == service && t == trace)
            .map(|(_, _, n)| n.clone())
            .collect()
    }
}

/// A trace id as lowercase hex (OTLP/JSON writes hex; base64 is accepted too).
fn hex_id(s: &str) -> String {
    use base64::Engine;
    if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return s.to_ascii_lowercase();
    }
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map(hex::encode)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_clients_traceparent_through_the_gateway_and_the_worker() {
    let receiver = Receiver::default();
    let otlp = receiver.start().await;
    let telemetry = format!(
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{otlp}\"\notlp_protocol = \"http/json\"\n"
    );
    let (s3, broker, worker, gw, key, port, _dir) =
        single_tenant("gwotel", &telemetry, &[("OTEL_BSP_SCHEDULE_DELAY", "100")]).await;
    let api = Api::new(port);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let (code, _, accepted) = api
        .post(&key, "/v1/jobs", &job(4), &[("traceparent", &traceparent)])
        .await;
    assert_eq!(code, 202, "{accepted}");
    assert_eq!(accepted["trace_id"], trace);
    let id = accepted["id"].as_str().unwrap();
    let events = api.events(&key, id, None).await;
    let result = &events.last().unwrap().2;
    assert_eq!(result["status"], "succeeded", "{result}");
    assert_eq!(result["trace_id"], trace, "{result}");
    // result.json says the same.
    let stored: Value = serde_json::from_slice(&s3.read(&format!("out/{id}/result.json"))).unwrap();
    assert_eq!(stored["trace_id"], trace);
    // The worker's log lines of the job carry the trace id.
    assert!(
        worker
            .log()
            .lines()
            .any(|l| l.contains("job succeeded") && l.contains(trace)),
        "{}",
        worker.log()
    );
    // The spans of both services, under the client's trace.
    let want_gw: BTreeSet<String> = ["submit", "validate", "publish"].map(String::from).into();
    let want_worker: BTreeSet<String> = [
        "job", "validate", "plan", "generate", "encode", "denoise", "decode", "upload",
    ]
    .map(String::from)
    .into();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (g, w) = (
            receiver.names("r2f-gateway", trace),
            receiver.names("r2f-worker", trace),
        );
        if want_gw.is_subset(&g) && want_worker.is_subset(&w) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gateway spans {g:?}, worker spans {w:?}\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // No span of the job went to another trace.
    let others: Vec<_> = receiver
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, t, n)| t != trace && (n == "submit" || n == "job"))
        .cloned()
        .collect();
    assert!(others.is_empty(), "{others:?}");
    drop(gw);
    drop(worker);
    broker.cleanup().await;
    drop(s3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_gateway_fails_readyz_ends_its_streams_and_exits() {
    let (s3, broker, worker, mut gw, key, port, _dir) = single_tenant("gwdrain", "", &[]).await;
    let api = Api::new(port);
    let (code, _, accepted) = api.post(&key, "/v1/jobs", &job(1_000_000), &[]).await;
    assert_eq!(code, 202);
    let id = accepted["id"].as_str().unwrap().to_string();
    api.wait_status(&key, &id, |v| v["state"] == "running")
        .await;
    // A stream open when the drain begins ends (the client resumes elsewhere).
    let stream = {
        let api = Api::new(port);
        let key = key.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let r = api
                .http
                .get(format!("{}/v1/jobs/{id}/events", api.base))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            let mut body = r.bytes_stream();
            let mut text = String::new();
            while let Some(Ok(c)) = body.next().await {
                text.push_str(&String::from_utf8_lossy(&c));
            }
            text
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match gw.http("/readyz").await {
            Some((503, why)) => {
                assert!(why.contains("draining"), "{why}");
                break;
            }
            other => assert!(Instant::now() < deadline, "{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = tokio::time::timeout(Duration::from_secs(5), stream)
        .await
        .expect("the stream ends")
        .unwrap();
    assert!(
        text.contains("event: queued") || text.contains("event:queued"),
        "{text}"
    );
    let status = gw.wait_exit(Duration::from_secs(10)).await.expect("exits");
    assert!(status.success(), "{}", gw.log());
    assert!(gw.log().contains("gateway stopped"));
    // The job is untouched by the gateway's exit.
    let redis = local_redis(&broker.names.prefix);
    let st = r2f::service::status::read(&redis, &r2f::service::tenancy::JobKey::single(&id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.state, r2f::job::JobState::Running);
    drop(worker);
    broker.cleanup().await;
    drop(s3);
}
