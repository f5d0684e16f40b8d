//! Clients as tenants, on the real RabbitMQ and Redis: a tenant's job ids are its own (no
//! message of another tenant reads, changes, cancels or replays them), a job's tenant is the
//! broker-checked `user_id`, the shipped broker definitions keep clients out of the workers'
//! queues and each other's, and a job's own content cannot pause a worker.
//!
//! Broker users are made with `rabbitmqctl` (the machine's RabbitMQ).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{json, Value};

use common::harness::*;
use r2f::service::redis_store::RedisStore;
use r2f::service::tenancy::{JobKey, Scope};

const T: Duration = Duration::from_secs(90);

fn url(user: &str, password: &str) -> String {
    format!("amqp://{user}:{password}@127.0.0.1:5672/%2f")
}

/// A connection and a confirm channel as `user`, retried while a user that was just made
/// becomes known to the broker.
async fn connect_as(user: &str, password: &str) -> (Connection, Channel) {
    for _ in 0..50 {
        if let Ok(conn) =
            Connection::connect(&url(user, password), ConnectionProperties::default()).await
        {
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            return (conn, ch);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("cannot connect as {user}");
}

/// Publishes (confirmed) as the channel's user, with `user_id` and an optional `reply_to`;
/// whether the broker took it.
async fn publish(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &Value,
    user_id: Option<&str>,
    reply_to: Option<&str>,
) -> bool {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(r2f::service::amqp::now_unix());
    if let Some(u) = user_id {
        props = props.with_user_id(u.into());
    }
    if let Some(r) = reply_to {
        props = props
            .with_reply_to(r.into())
            .with_correlation_id(format!("c-{}", body["id"].as_str().unwrap_or("")).into());
    }
    let sent = ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body.to_string().as_bytes(),
            props,
        )
        .await;
    match sent {
        Ok(confirm) => matches!(confirm.await, Ok(c) if c.is_ack()),
        Err(_) => false,
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A tenant's job body (the tiny model, plain mode).
fn job(id: &str, steps: u32) -> Value {
    tiny_job(id, steps)
}

async fn status(redis: &RedisStore, tenant: &str, id: &str) -> Option<Value> {
    let key = JobKey::new(Scope::tenant(tenant), id);
    r2f::service::status::read(redis, &key)
        .await
        .unwrap()
        .map(|s| serde_json::to_value(s).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_of_another_tenant_touches_a_tenants_job() {
    let names = Names::new(&unique("tenants"));
    let p = names.prefix.clone();
    let (wu, au, bu) = (format!("{p}-w"), format!("{p}-a"), format!("{p}-b"));
    // The worker re-publishes jobs with their user_id (retries, routing): it impersonates.
    broker_user(&wu, "pw-w", &["impersonator"]);
    broker_user(&au, "pw-a", &[]);
    broker_user(&bu, "pw-b", &[]);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WorkerConfig::new(&names);
    cfg.amqp_url = url(&wu, "pw-w");
    cfg.local_dir = Some(dir.path().to_path_buf());
    cfg.worker_extra = "cancel_poll_ms = 100".into();
    cfg.extra = format!(
        "[limits]\nmax_steps = 1000000\n[tenancy]\nmode = \"multi\"\n[tenants.a]\nusers = [\"{au}\"]\n[tenants.b]\nusers = [\"{bu}\"]\n"
    );
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let (_ca, a) = connect_as(&au, "pw-a").await;
    let (_cb, b) = connect_as(&bu, "pw-b").await;
    let redis = local_redis(&p);
    let route = names.route.clone();
    let (fin, run, queued) = (
        format!("{p}-fin"),
        format!("{p}-run"),
        format!("{p}-queued"),
    );

    // A's jobs: one finished, one running, one queued behind it.
    assert!(publish(&a, &route, "tiny", &job(&fin, 2), Some(&au), None).await);
    let done = |id: String| move |v: &Value, rk: &str| is_final(rk) && v["id"] == id.as_str();
    let (ev, rk) = broker
        .wait_event(T, done(fin.clone()))
        .await
        .expect("fin's event");
    assert_eq!(ev["status"], "succeeded", "{ev}");
    assert_eq!(rk, format!("job.succeeded.a.{fin}"));
    assert_eq!(ev["tenant"], "a");
    assert!(publish(&a, &route, "tiny", &job(&run, 1_000_000), Some(&au), None).await);
    let running = run.clone();
    broker
        .wait_event(T, move |v, rk| {
            rk.starts_with("job.progress.a.") && v["id"] == running.as_str()
        })
        .await
        .expect("run is running");
    assert!(publish(&a, &route, "tiny", &job(&queued, 2), Some(&au), None).await);
    let fin_record = status(&redis, "a", &fin).await.expect("fin's record");
    let fin_result = std::fs::read(dir.path().join(format!("a/{fin}/result.json"))).unwrap();

    // B, against each of A's ids: an invalid body, a valid copy, another body, a copy again,
    // and a cancel through the control exchange.
    for id in [&fin, &run, &queued] {
        let steps = if *id == run { 1_000_000 } else { 2 };
        let copy = job(id, steps);
        let mut other = job(id, 3);
        other["prompt"] = json!("another prompt altogether");
        let invalid = json!({"id": id, "prompt": ""});
        for body in [&invalid, &copy, &other, &copy] {
            assert!(publish(&b, &route, "tiny", body, Some(&bu), None).await);
        }
        assert!(
            publish(
                &b,
                &names.control,
                "cancel",
                &json!({"id": id}),
                Some(&bu),
                None
            )
            .await
        );
    }
    // A's running job runs on: B's cancel is for B's job of that id.
    tokio::time::sleep(secs(2)).await;
    let r = status(&redis, "a", &run).await.unwrap();
    assert_eq!(r["state"], "running", "{r}");
    // A cancels its own.
    assert!(
        publish(
            &a,
            &names.control,
            "cancel",
            &json!({"id": run}),
            Some(&au),
            None
        )
        .await
    );
    let (ev, _) = broker
        .wait_event(T, done(run.clone()))
        .await
        .expect("run's end");
    assert_eq!(ev["status"], "cancelled", "{ev}");
    assert_eq!(ev["tenant"], "a");

    // Everything drains: A's queued job, then B's 12 messages.
    let queued_done = broker.wait_event(T, done(queued.clone())).await.unwrap();
    assert_eq!(queued_done.0["status"], "succeeded");
    assert_eq!(queued_done.0["tenant"], "a");
    let deadline = std::time::Instant::now() + T;
    loop {
        let settled = broker.queue_len(&names.jobs).await == 0;
        if settled {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", worker.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(secs(2)).await;
    // Collect what is left of the events.
    while broker.wait_event(secs(1), |_, _| false).await.is_some() {}

    // A's finished job: record and result.json untouched.
    assert_eq!(status(&redis, "a", &fin).await.unwrap(), fin_record);
    assert_eq!(
        std::fs::read(dir.path().join(format!("a/{fin}/result.json"))).unwrap(),
        fin_result
    );
    // A's events: one final event per job, all A's own.
    let a_final: Vec<&Value> = broker
        .events_seen
        .iter()
        .filter(|v| v["tenant"] == "a" && v.get("status").is_some())
        .collect();
    let mut by_id: HashMap<&str, Vec<&str>> = HashMap::new();
    for v in &a_final {
        by_id
            .entry(v["id"].as_str().unwrap())
            .or_default()
            .push(v["status"].as_str().unwrap());
    }
    assert_eq!(
        by_id.get(fin.as_str()),
        Some(&vec!["succeeded"]),
        "{by_id:?}"
    );
    assert_eq!(
        by_id.get(run.as_str()),
        Some(&vec!["cancelled"]),
        "{by_id:?}"
    );
    assert_eq!(
        by_id.get(queued.as_str()),
        Some(&vec!["succeeded"]),
        "{by_id:?}"
    );
    assert_eq!(by_id.len(), 3, "{by_id:?}");
    for id in [&run, &queued] {
        let r = status(&redis, "a", id).await.unwrap();
        assert!(
            r["history"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["state"] != "rejected"),
            "{r}"
        );
    }
    // B got its own answers: its invalid bodies rejected, its copies its own jobs (cancelled by
    // its own cancel requests, which came first), its other bodies refused as duplicate ids
    // (dead-lettered, never announced), its copies sent again replayed from its own results.
    let b_final: Vec<&Value> = broker
        .events_seen
        .iter()
        .filter(|v| v["tenant"] == "b" && v.get("status").is_some())
        .collect();
    for id in [&fin, &run, &queued] {
        let statuses: Vec<&str> = b_final
            .iter()
            .filter(|v| v["id"] == id.as_str())
            .map(|v| v["status"].as_str().unwrap())
            .collect();
        assert_eq!(
            statuses,
            vec!["rejected", "cancelled", "cancelled"],
            "{id}: {statuses:?}"
        );
    }
    let dead = broker.take_dead_letters().await;
    let dups = dead.iter().filter(|d| d.2 == "duplicate_id").count();
    assert_eq!(dups, 3, "{dead:?}");
    assert!(
        dir.path().join(format!("b/{fin}/result.json")).exists(),
        "B's copy is B's own job"
    );

    // No user_id: the worker refuses the job (never announced). A forged one: the broker does.
    let anonymous = format!("{p}-anon");
    broker
        .publish_at(&route, "tiny", job(&anonymous, 2).to_string().as_bytes())
        .await;
    let forged = format!("{p}-forged");
    assert!(
        !publish(&b, &route, "tiny", &job(&forged, 2), Some(&au), None).await,
        "the broker refuses a user_id that is not the connection's user"
    );
    tokio::time::sleep(secs(2)).await;
    let dead = broker.take_dead_letters().await;
    assert!(
        dead.iter()
            .any(|d| d.0["id"] == anonymous.as_str() && d.1.contains("no user_id")),
        "{dead:?}"
    );
    assert!(!broker
        .events_seen
        .iter()
        .any(|v| v["id"] == anonymous.as_str() || v["id"] == forged.as_str()));
    broker.cleanup().await;
}

fn definitions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rabbitmq/definitions.json")
}

/// Whether the broker allowed an operation: it refuses by closing the channel.
async fn allowed<F: std::future::Future<Output = Result<(), lapin::Error>>>(op: F) -> bool {
    matches!(tokio::time::timeout(secs(10), op).await, Ok(Ok(())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_definitions_keep_clients_to_their_own() {
    let path = definitions();
    ctl(&["import_definitions", path.to_str().unwrap()]);
    // The file ships users without passwords: an operator sets them.
    let mut tries = 0;
    while Command::new("rabbitmqctl")
        .args(["change_password", "acme", "pw-acme"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        tries += 1;
        assert!(tries < 50, "the import did not create acme");
        std::thread::sleep(Duration::from_millis(200));
    }
    ctl(&["change_password", "globex", "pw-globex"]);
    // The production topology, as a worker declares it.
    let settings = r2f::config::Settings::load(None).unwrap();
    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let admin = conn.create_channel().await.unwrap();
    r2f::service::amqp::declare_topology(&admin, &settings.amqp, &settings.routed_models())
        .await
        .unwrap();
    // The dead-letter queue is bounded by the shipped policy (drop-head at 100000).
    let deadline = std::time::Instant::now() + secs(10);
    loop {
        let queues = ctl(&["list_queues", "name", "policy", "--quiet"]);
        if queues
            .lines()
            .any(|l| l.starts_with("r2f.jobs.dead\t") && l.contains("r2f-dead-letters-bounded"))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{queues}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let (acme_conn, acme) = connect_as("acme", "pw-acme").await;
    // A client publishes jobs and cancel requests as itself...
    let mine = json!({"id": "defs-acme-1", "prompt": "p", "model": "sd3"});
    assert!(publish(&acme, "r2f.jobs", "sd3", &mine, Some("acme"), None).await);
    assert!(
        publish(
            &acme,
            "r2f.control",
            "cancel",
            &json!({"id": "x"}),
            Some("acme"),
            None
        )
        .await
    );
    // ...binds its own reply queue to its own events...
    let q = "r2f.reply.acme.defs-test";
    let declare = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    acme.queue_declare(q.into(), declare, FieldTable::default())
        .await
        .unwrap();
    let bind = |ch: Channel, key: &'static str| async move {
        ch.queue_bind(
            q.into(),
            "r2f.events".into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    };
    assert!(allowed(bind(acme.clone(), "job.*.acme.#")).await);
    // ...and nothing else: everyone's events,
    assert!(
        !allowed(bind(acme.clone(), "job.#")).await,
        "bound to every tenant's events"
    );
    let acme = acme_conn.create_channel().await.unwrap();
    acme.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // a jobs queue,
    let consume = acme
        .basic_consume(
            "r2f.jobs.sd3".into(),
            "thief".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(consume.is_err(), "consumed a jobs queue");
    let acme = acme_conn.create_channel().await.unwrap();
    acme.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // publishing events, or as another tenant,
    let fake = json!({"id": "x", "status": "succeeded"});
    assert!(
        !publish(
            &acme,
            "r2f.events",
            "job.succeeded.globex.x",
            &fake,
            Some("acme"),
            None
        )
        .await,
        "published an event"
    );
    let acme = acme_conn.create_channel().await.unwrap();
    acme.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    assert!(
        !publish(&acme, "r2f.jobs", "sd3", &mine, Some("globex"), None).await,
        "published as another tenant"
    );
    // and another tenant's reply queue.
    let (_globex_conn, globex) = connect_as("globex", "pw-globex").await;
    let theirs = "r2f.reply.globex.defs-test";
    globex
        .queue_declare(
            theirs.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let acme = acme_conn.create_channel().await.unwrap();
    let got = acme
        .basic_get(theirs.into(), BasicGetOptions::default())
        .await;
    assert!(got.is_err(), "read another tenant's reply queue");
    let acme = acme_conn.create_channel().await.unwrap();
    let stolen = acme
        .basic_consume(
            theirs.into(),
            "thief".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(stolen.is_err(), "consumed another tenant's reply queue");
    let _ = globex.queue_delete(theirs.into(), Default::default()).await;
    // The gateway's user publishes jobs as any tenant (impersonator) and does nothing else.
    ctl(&["change_password", "r2f-gateway", "pw-gateway"]);
    let (gw_conn, gw) = connect_as("r2f-gateway", "pw-gateway").await;
    let job = json!({"id": "defs-gw-1", "prompt": "p", "model": "sd3"});
    assert!(publish(&gw, "r2f.jobs", "sd3", &job, Some("globex"), None).await);
    let gw = gw_conn.create_channel().await.unwrap();
    gw.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    assert!(!publish(&gw, "r2f.events", "job.succeeded.acme.x", &job, None, None).await);
    let gw = gw_conn.create_channel().await.unwrap();
    let declared = gw
        .queue_declare(
            "r2f.gateway-test".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(declared.is_err(), "the gateway declared a queue");
    let gw = gw_conn.create_channel().await.unwrap();
    let read = gw
        .basic_get("r2f.jobs.sd3".into(), BasicGetOptions::default())
        .await;
    assert!(read.is_err(), "the gateway read a jobs queue");
    for q in ["r2f.jobs.sd3", "r2f.jobs", "r2f.control"] {
        let _ = admin.queue_purge(q.into(), Default::default()).await;
    }
}

/// Three jobs whose JPEG metadata cannot fit one 64 KiB segment (a prompt and a plan of `'`,
/// escaped six times over, all within the limits: about 200 KB of XMP) succeed: the record goes
/// to ExtendedXMP chunks, reads back whole, and an independent decoder opens the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_whose_jpeg_metadata_exceeds_one_segment_succeed_with_extended_xmp() {
    let names = Names::new(&unique("jpegmeta"));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = WorkerConfig::new(&names);
    cfg.local_dir = Some(dir.path().to_path_buf());
    let mut broker = Broker::connect(&names).await;
    let mut worker = WorkerProc::spawn(&cfg);
    assert!(worker.wait_ready(T).await, "{}", worker.log());
    let p = &names.prefix;
    let quotes = "'".repeat(2000);
    let prompts: Vec<String> = (0..16).map(|_| quotes.clone()).collect();
    let levels: Vec<&str> = vec!["3"; 15];
    for i in 0..3 {
        let mut j = tiny_job(&format!("{p}-big-{i}"), 2);
        j["prompt"] = json!(quotes);
        j["mode"] = json!("r2f");
        j["plan"] = json!({"visual_detail_level": levels, "r2f_prompt": [prompts]});
        j["output"] = json!({"format": "jpeg"});
        broker.publish(&j).await;
    }
    let results = broker.wait_results(3, T).await;
    assert_eq!(results.len(), 3, "{}", worker.log());
    for r in &results {
        assert_eq!(r["status"], "succeeded", "{r}");
        let uri = r["outputs"][0]["uri"].as_str().unwrap();
        let path = uri.strip_prefix("file://").unwrap();
        let bytes = std::fs::read(path).unwrap();
        assert!(bytes.len() > 200_000, "{}", bytes.len());
        let (fields, marked) = r2f::image::read_metadata(&bytes).unwrap();
        assert!(marked);
        let record = r2f::generate::GenerationRecord::from_fields(&fields).unwrap();
        assert_eq!(record.prompt, quotes);
        assert_eq!(
            serde_json::to_value(&record).unwrap(),
            r["outputs"][0]["metadata"]
        );
        let plan = record.plan.unwrap();
        assert_eq!(plan["r2f_prompt"][0][15], json!(quotes));
        // Pillow decodes it (its XMP: the StandardXMP packet, which carries the marking).
        let read = std::process::Command::new(common::venv_python())
            .args([
                "-c",
                "import sys; from PIL import Image; im = Image.open(sys.argv[1]); im.load(); \
                 print(im.size, 'trainedAlgorithmicMedia' in str(im.info.get('xmp')))",
            ])
            .arg(path)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&read.stdout);
        assert_eq!(
            said.trim(),
            "(64, 48) True",
            "{}",
            String::from_utf8_lossy(&read.stderr)
        );
    }
    assert_eq!(worker.http("/readyz").await.unwrap().0, 200);
    let ok = format!("{p}-ok");
    let mut j = tiny_job(&ok, 2);
    j["output"] = json!({"format": "jpeg"});
    broker.publish(&j).await;
    let r = broker.wait_results(1, T).await;
    assert_eq!(r[0]["status"], "succeeded", "{r:?}");
    assert_eq!(worker.http("/readyz").await.unwrap().0, 200);
    assert_eq!(metric(&worker, "r2f_worker_pauses_total").await, 0.0);
    broker.cleanup().await;
}
