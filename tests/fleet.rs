//! A fleet on one broker and the client side, against the real RabbitMQ and Redis and the
//! `r2f` binary: an SD3 worker and an SDXL worker (the bundled tiny models) each take their own
//! model's jobs, whichever way a client sends them; unknown models are rejected; jobs are
//! cancelled while queued and while running.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::harness::*;
use serde_json::json;

const T: Duration = Duration::from_secs(120);

fn job(id: &str, model: Option<&str>, steps: u32) -> serde_json::Value {
    let mut j = json!({
        "id": id,
        "prompt": "a hairy frog warrior",
        "mode": "plain",
        "params": {"steps": steps, "guidance": 5.0, "width": 64, "height": 64, "seed": 3}
    });
    if let Some(m) = model {
        j["model"] = json!(m);
    }
    j
}

fn cli(config: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_r2f"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn config_file(cfg: &WorkerConfig) -> tempfile::TempPath {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut f, cfg.toml().as_bytes()).unwrap();
    f.into_temp_path()
}

/// The acceptance case of the fleet: two models on one broker, jobs sent to the exchange, to
/// the inbox (the single queue of earlier versions), to the wrong model's queue and through
/// `r2f enqueue`; every job is done by its model's worker, none is dead-lettered but the ones
/// for a model that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_reaches_its_models_worker_and_unknown_models_are_rejected() {
    let names = Names::new(&unique("fleet"));
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::connect_fleet(&names).await;
    let mut workers = Vec::new();
    let mut configs = HashMap::new();
    for (model, _) in FLEET {
        let mut cfg = WorkerConfig::new(&names);
        cfg.local_dir = Some(dir.path().to_path_buf());
        cfg.fleet_model = Some(model.into());
        configs.insert(model, config_file(&cfg));
        workers.push((model, WorkerProc::spawn(&cfg)));
    }
    for (_, w) in &mut workers {
        assert!(w.wait_ready(T).await, "{}", w.log());
    }
    let p = &names.prefix;
    // (id, how it is sent, the model whose worker must do it; None: rejected)
    let mut expect: Vec<(String, Option<&str>)> = Vec::new();
    for i in 0..3 {
        for (model, _) in FLEET {
            let id = format!("{p}-x-{model}-{i}");
            let body = job(&id, Some(model), 2).to_string();
            broker
                .publish_at(&names.route, model, body.as_bytes())
                .await;
            expect.push((id, Some(model)));
        }
    }
    // Straight to the inbox, as clients of the single-queue version did.
    for (model, _) in FLEET {
        let id = format!("{p}-inbox-{model}");
        let body = job(&id, Some(model), 2).to_string();
        broker.publish_at("", &names.inbox, body.as_bytes()).await;
        expect.push((id, Some(model)));
    }
    // An SDXL job in the SD3 queue is sent on, not dead-lettered.
    let id = format!("{p}-stray-sdxl");
    let body = job(&id, Some("sdxl"), 2).to_string();
    broker
        .publish_at("", &names.queue_of("sd3"), body.as_bytes())
        .await;
    expect.push((id, Some("sdxl")));
    // Unknown models, through the exchange and through the inbox.
    for (how, exchange, key) in [
        ("exchange", names.route.as_str(), "sd9"),
        ("inbox", "", names.inbox.as_str()),
    ] {
        let id = format!("{p}-unknown-{how}");
        let body = job(&id, Some("sd9"), 2).to_string();
        broker.publish_at(exchange, key, body.as_bytes()).await;
        expect.push((id, None));
    }
    // `r2f enqueue` routes each line by its model and refuses a model without a queue.
    let lines: Vec<String> = [("sd3", "e-sd3"), ("sdxl", "e-sdxl"), ("sd9", "e-sd9")]
        .iter()
        .map(|(m, id)| job(&format!("{p}-{id}"), Some(m), 2).to_string())
        .collect();
    let jsonl = dir.path().join("jobs.jsonl");
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let out = cli(&configs["sd3"], &["enqueue", jsonl.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a refused line fails the command");
    assert!(
        stderr.contains("line 3: not published: unknown model `sd9` (known models: sd3, sdxl)"),
        "{stderr}"
    );
    expect.push((format!("{p}-e-sd3"), Some("sd3")));
    expect.push((format!("{p}-e-sdxl"), Some("sdxl")));

    let results = broker.wait_results(expect.len(), T).await;
    let logs = || {
        workers
            .iter()
            .map(|(_, w)| w.log())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    assert_eq!(results.len(), expect.len(), "{results:#?}\n{}", logs());
    let by_id: HashMap<&str, &serde_json::Value> = results
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    assert_eq!(by_id.len(), expect.len(), "one event per job: {results:#?}");
    for (id, model) in &expect {
        let r = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("no event for {id}"));
        match model {
            Some(m) => {
                assert_eq!(r["status"], "succeeded", "{r}");
                let worker = r["worker"].as_str().unwrap();
                assert_eq!(worker, format!("{p}-{m}-worker"), "{id} done by {worker}");
                assert_eq!(r["attempt"], 1, "{r}");
            }
            None => {
                assert_eq!(r["status"], "rejected", "{r}");
                let msg = r["error"]["message"].as_str().unwrap();
                assert!(msg.contains("unknown model `sd9`"), "{msg}");
            }
        }
    }
    // Only the unknown models were dead-lettered, each with its reason.
    let dead = broker.take_dead_letters().await;
    let mut dead_ids: Vec<String> = dead
        .iter()
        .map(|(b, _, _)| b["id"].as_str().unwrap().to_string())
        .collect();
    dead_ids.sort();
    assert_eq!(
        dead_ids,
        [
            format!("{p}-unknown-exchange"),
            format!("{p}-unknown-inbox")
        ]
    );
    // The worker that sent jobs on counted them.
    let routed: f64 = {
        let mut n = 0.0;
        for (_, w) in &workers {
            n += metric(w, "r2f_jobs_routed_total").await;
        }
        n
    };
    assert!(routed >= 3.0, "inbox and stray jobs routed: {routed}");
    broker.cleanup().await;
}

/// Cancellation: a job cancelled before a worker takes it is dropped when taken; a running one
/// stops at its next denoising step. Either way: `cancelled` event and status, no image, the
/// message acked; `wait` returns on it (not a success); a finished job cannot be cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_drops_a_queued_job_and_stops_a_running_one() {
    let names = Names::new(&unique("cancel"));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WorkerConfig::new(&names);
    cfg.local_dir = Some(dir.path().to_path_buf());
    cfg.worker_extra = "cancel_poll_ms = 100".into();
    // A job long enough that it is still running when the cancellation comes, on any machine.
    cfg.extra = "[limits]\nmax_steps = 1000000".into();
    let config = config_file(&cfg);
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let p = &names.prefix;

    // Queued: the request comes first, the job after (published straight to the broker, so
    // no status record yet: without --force nothing is recorded).
    let queued = format!("{p}-queued");
    let out = cli(&config, &["cancel", &queued]);
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    let out = cli(&config, &["cancel", &queued, "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["cancel"], "requested");
    assert_eq!(answer["state"], "unknown");
    broker.publish(&tiny_job(&queued, 2)).await;
    let (ev, rk) = broker
        .wait_event(T, |v, rk| is_final(rk) && v["id"] == queued.as_str())
        .await
        .expect("an event for the queued job");
    assert_eq!(rk, "job.cancelled");
    assert_eq!(ev["status"], "cancelled", "{ev}");
    assert_eq!(ev["error"]["kind"], "cancelled", "{ev}");

    // Running: cancelled once its progress shows it generating. Its transitions are announced
    // on its status channel (what `r2f wait` listens to).
    let running = format!("{p}-running");
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(format!("{p}:status-changed:{running}"))
        .await
        .unwrap();
    broker.publish(&tiny_job(&running, 1_000_000)).await;
    broker
        .wait_event(T, |v, rk| {
            rk == format!("job.progress.{}", v["id"].as_str().unwrap_or(""))
                && v["id"] == running.as_str()
        })
        .await
        .expect("progress of the running job");
    let out = cli(&config, &["cancel", &running]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["state"], "running", "{answer}");
    let (ev, rk) = broker
        .wait_event(T, |v, rk| is_final(rk) && v["id"] == running.as_str())
        .await
        .unwrap_or_else(|| panic!("the running job did not stop:\n{}", worker.log()));
    assert_eq!(rk, "job.cancelled", "{ev}");
    assert!(worker.wait_log("generation stopped between steps", T).await);
    let mut announced = Vec::new();
    {
        use futures::StreamExt;
        let mut messages = pubsub.on_message();
        while announced.len() < 2 {
            let m = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .expect("an announcement")
                .unwrap();
            let what = m.get_payload::<String>().unwrap();
            // Progress writes are announced too; the transitions are what is checked here.
            if what != "progress" {
                announced.push(what);
            }
        }
    }
    assert_eq!(announced, ["running", "cancelled"]);

    for id in [&queued, &running] {
        // `wait` returns on the cancellation, and it is not a success.
        let out = cli(&config, &["wait", id, "--timeout", "10"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled"));
        let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(record["state"], "cancelled", "{record}");
        // No image; result.json records the cancellation.
        let job_dir = dir.path().join(id);
        assert!(
            !job_dir.join("0.png").exists(),
            "no output of a cancelled job"
        );
        let stored: serde_json::Value =
            serde_json::from_slice(&std::fs::read(job_dir.join("result.json")).unwrap()).unwrap();
        assert_eq!(stored["status"], "cancelled");
    }
    // Acked: nothing left in the queue, nothing dead-lettered.
    assert_eq!(broker.queue_len(&names.jobs).await, 0);
    assert!(broker.take_dead_letters().await.is_empty());

    // The worker goes on with the next job; a finished job cannot be cancelled.
    let ok = format!("{p}-ok");
    broker.publish(&tiny_job(&ok, 2)).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r.len(), 1, "{}", worker.log());
    assert_eq!(r[0]["status"], "succeeded", "{}", r[0]);
    let out = cli(&config, &["cancel", &ok]);
    assert!(!out.status.success());
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["cancel"], "too_late", "{answer}");
    assert_eq!(answer["state"], "succeeded", "{answer}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to cancel"));
    assert_eq!(worker.http("/healthz").await.unwrap().0, 200);
    broker.cleanup().await;
}

/// The next delivery of a consumer within 5 s.
async fn next_delivery(c: &mut lapin::Consumer) -> Option<lapin::message::Delivery> {
    use futures::StreamExt;
    tokio::time::timeout(Duration::from_secs(5), c.next())
        .await
        .ok()
        .flatten()
        .map(|d| d.expect("a delivery"))
}

/// Results delivered where the client is: the terminal event also goes to the message's
/// `reply_to` queue with its `correlation_id` (exactly once; RabbitMQ's direct reply-to
/// included), and with `storage.presign_ttl_secs` each output carries a URL that downloads the
/// image from the S3 without credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_gets_one_terminal_event_and_presigned_urls_download_the_image() {
    use lapin::options::*;
    use lapin::types::FieldTable;
    use lapin::BasicProperties;
    use sha2::Digest;

    let (names, _s3, mut cfg) = s3_setup("reply").await;
    cfg.storage_extra = "presign_ttl_secs = 600".into();
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let ch = broker.conn.create_channel().await.unwrap();
    // A reply queue of the client's own, and RabbitMQ's direct reply-to pseudo-queue.
    let q = private_queue(&ch).await;
    let consume = |queue: String, tag: &'static str| {
        let ch = ch.clone();
        async move {
            ch.basic_consume(
                queue.as_str().into(),
                tag.into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
        }
    };
    let mut replies = consume(q.name().to_string(), "replies").await;
    let mut direct = consume("amq.rabbitmq.reply-to".into(), "direct").await;
    let p = &names.prefix;
    let publish = |id: String, reply_to: String, body: serde_json::Value| {
        let ch = ch.clone();
        let queue = names.jobs.clone();
        async move {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_reply_to(reply_to.as_str().into())
                .with_correlation_id(format!("corr-{id}").as_str().into());
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                props,
            )
            .await
            .unwrap();
        }
    };
    let (good, bad, rpc) = (format!("{p}-good"), format!("{p}-bad"), format!("{p}-rpc"));
    publish(good.clone(), q.name().to_string(), tiny_job(&good, 2)).await;
    let mut bad_job = tiny_job(&bad, 2);
    bad_job["params"]["width"] = json!(50);
    publish(bad.clone(), q.name().to_string(), bad_job).await;
    publish(
        rpc.clone(),
        "amq.rabbitmq.reply-to".into(),
        tiny_job(&rpc, 2),
    )
    .await;
    // A reply_to naming r2f's own jobs queue is not answered (no result fed back as a job).
    let own = format!("{p}-own");
    publish(own.clone(), names.jobs.clone(), tiny_job(&own, 2)).await;
    let results = broker.wait_results(4, T).await;
    assert_eq!(results.len(), 4, "{}", worker.log());
    assert!(worker.wait_log("reply_to not answered", T).await);
    assert_eq!(broker.queue_len(&names.jobs).await, 0);

    let mut got = HashMap::new();
    for _ in 0..2 {
        let d = next_delivery(&mut replies).await.expect("a reply");
        let ev: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        let id = ev["id"].as_str().unwrap().to_string();
        let corr = d.properties.correlation_id().clone().unwrap();
        assert_eq!(corr.as_str(), format!("corr-{id}"));
        got.insert(id, ev);
    }
    assert_eq!(got[&good]["status"], "succeeded");
    assert_eq!(got[&bad]["status"], "rejected");
    // Exactly one each: nothing more comes.
    assert!(
        next_delivery(&mut replies).await.is_none(),
        "a second reply"
    );
    let d = next_delivery(&mut direct)
        .await
        .expect("a direct reply-to answer");
    let ev: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(ev["id"], rpc.as_str());
    assert_eq!(ev["status"], "succeeded");

    // The presigned URL downloads exactly the image, without credentials.
    let out = &got[&good]["outputs"][0];
    let url = out["url"].as_str().expect("a presigned url");
    assert!(url.contains("X-Amz-Signature"), "{url}");
    let resp = reqwest::get(url).await.unwrap();
    assert_eq!(resp.status(), 200, "{url}");
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), out["sha256"]);
    // A tampered signature is refused.
    let tampered = url.replace("X-Amz-Signature=", "X-Amz-Signature=0");
    assert_ne!(reqwest::get(&tampered).await.unwrap().status(), 200);
    broker.cleanup().await;
}

/// Webhooks (Standard Webhooks): the terminal event is POSTed with an HMAC-SHA256 signature
/// over the webhook id, the timestamp and the body; a 503 is retried under the same id; the
/// event filter is honoured; a host outside the allow-list is refused when the job is validated
/// (and never called).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_filtered_and_held_to_the_allow_list() {
    use hmac::Mac;
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<(HashMap<String, String>, Vec<u8>)>>>;
    let seen: Seen = Arc::default();
    let app = {
        let seen = seen.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let seen = seen.clone();
                    async move {
                        let h = headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                            .collect();
                        let mut s = seen.lock().unwrap();
                        s.push((h, body.to_vec()));
                        // The first call fails: the sender must retry.
                        if s.len() == 1 {
                            axum::http::StatusCode::SERVICE_UNAVAILABLE
                        } else {
                            axum::http::StatusCode::OK
                        }
                    }
                },
            ),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let names = Names::new(&unique("hook"));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WorkerConfig::new(&names);
    cfg.local_dir = Some(dir.path().to_path_buf());
    // The receiver is on loopback: its network and port are allowed explicitly.
    cfg.extra = format!(
        "[webhook]\nallowed_hosts = [\"127.0.0.1\"]\nallow_http = true\nretry_min_ms = 200\nallowed_ports = [{port}]\nallowed_networks = [\"127.0.0.0/8\"]"
    );
    let secret = "whsec-test-7f3a";
    cfg.env.push(("R2F_WEBHOOK_SECRET".into(), secret.into()));
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let p = &names.prefix;
    let (good, filtered, outside) = (
        format!("{p}-good"),
        format!("{p}-filtered"),
        format!("{p}-outside"),
    );
    let mut j = tiny_job(&good, 2);
    j["output"] = json!({"webhook": {"url": hook}});
    broker.publish(&j).await;
    let mut j = tiny_job(&filtered, 2);
    j["output"] = json!({"webhook": {"url": hook, "events": ["failed"]}});
    broker.publish(&j).await;
    let mut j = tiny_job(&outside, 2);
    j["output"] = json!({"webhook": {"url": "http://169.254.169.254/latest/meta-data"}});
    broker.publish(&j).await;
    let results = broker.wait_results(3, T).await;
    assert_eq!(results.len(), 3, "{}", worker.log());
    let by_id: HashMap<&str, &serde_json::Value> = results
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    assert_eq!(by_id[good.as_str()]["status"], "succeeded");
    assert_eq!(by_id[filtered.as_str()]["status"], "succeeded");
    let r = by_id[outside.as_str()];
    assert_eq!(r["status"], "rejected", "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(msg.contains("is not an allowed host"), "{msg}");

    // The good job's event arrives twice: a 503, then a 200.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", worker.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "only the good job's event, retried once");
    for (h, body) in &seen {
        let ev: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(ev["type"], "job.succeeded");
        assert_eq!(ev["data"]["id"], good.as_str());
        assert_eq!(ev["data"]["status"], "succeeded");
        assert_eq!(h["content-type"], "application/json");
        let ts: u64 = h["webhook-timestamp"].parse().unwrap();
        let now = r2f::service::amqp::now_unix();
        assert!(ts <= now && now - ts < 120, "timestamp {ts}");
        // A secret without the whsec_ prefix is the key's bytes.
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{}.{ts}.", h["webhook-id"]).as_bytes());
        mac.update(body);
        use base64::Engine;
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(h["webhook-signature"], expected);
    }
    assert_eq!(seen[0].0["webhook-id"], seen[1].0["webhook-id"]);
    assert_eq!(
        metric(&worker, "r2f_webhook_deliveries_total{outcome=\"ok\"}").await,
        1.0
    );
    assert_eq!(
        metric(&worker, "r2f_webhook_deliveries_total{outcome=\"retry\"}").await,
        1.0
    );
    broker.cleanup().await;
}

/// Output formats: PNG (text chunks), JPEG and lossy WebP (XMP), each decodable, each carrying
/// the job's metadata; an unknown format is rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_output_format_decodes_with_its_metadata() {
    let names = Names::new(&unique("formats"));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WorkerConfig::new(&names);
    cfg.local_dir = Some(dir.path().to_path_buf());
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let p = &names.prefix;
    for (format, quality) in [
        ("png", None),
        ("jpeg", Some(80)),
        ("webp", Some(75)),
        ("gif", None),
    ] {
        let mut j = tiny_job(&format!("{p}-{format}"), 2);
        j["output"] = json!({"format": format});
        if let Some(q) = quality {
            j["output"]["quality"] = json!(q);
        }
        broker.publish(&j).await;
    }
    let results = broker.wait_results(4, T).await;
    assert_eq!(results.len(), 4, "{}", worker.log());
    let by_id: HashMap<&str, &serde_json::Value> = results
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r))
        .collect();
    let gif = by_id[format!("{p}-gif").as_str()];
    assert_eq!(gif["status"], "rejected");
    assert!(gif["error"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown output format `gif` (expected png, jpeg or webp)"));
    for (format, ext) in [("png", "png"), ("jpeg", "jpg"), ("webp", "webp")] {
        let id = format!("{p}-{format}");
        let r = by_id[id.as_str()];
        assert_eq!(r["status"], "succeeded", "{r}");
        let uri = r["outputs"][0]["uri"].as_str().unwrap();
        assert!(uri.ends_with(&format!("/{id}/0.{ext}")), "{uri}");
        let bytes = std::fs::read(dir.path().join(&id).join(format!("0.{ext}"))).unwrap();
        let (w, h, meta) = match format {
            "png" => {
                let (w, h, _, text) = r2f::image::decode_png(&bytes).unwrap();
                (w, h, text)
            }
            "jpeg" => {
                let mut d = jpeg_decoder::Decoder::new(std::io::Cursor::new(&bytes));
                d.decode().unwrap();
                let info = d.info().unwrap();
                // The XMP packet sits in an APP1 segment behind its signature.
                let header = r2f::image::XMP_JPEG_HEADER;
                assert!(bytes.windows(header.len()).any(|w| w == header), "APP1 XMP");
                (
                    info.width as u32,
                    info.height as u32,
                    r2f::image::read_xmp(&bytes),
                )
            }
            _ => {
                let img = webp::Decoder::new(&bytes).decode().expect("WebP decodes");
                (img.width(), img.height(), r2f::image::read_xmp(&bytes))
            }
        };
        assert_eq!((w, h), (64, 48), "{format}");
        let get = |k: &str| {
            meta.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            get("prompt").as_deref(),
            Some("a hairy frog warrior"),
            "{format}: {meta:?}"
        );
        assert_eq!(get("seed").as_deref(), Some("7"), "{format}");
        assert_eq!(get("model").as_deref(), Some("tiny"), "{format}");
    }
    broker.cleanup().await;
}
