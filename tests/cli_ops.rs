//! The command line as scripts use it: distinct exit statuses (usage 64, bad data 65,
//! dependency unavailable 69, try again later 75, configuration 78), strict configuration
//! (unknown keys named with their source, lists and URL files from the environment),
//! `r2f config check`, and the edges of `generate` and `cancel` (real RabbitMQ and Redis).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::harness::{local_redis, unique};
use common::model_dir;

fn r2f() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_r2f"));
    // Nothing of the caller's environment configures these runs.
    for (k, _) in std::env::vars() {
        if k.starts_with("R2F__") {
            c.env_remove(k);
        }
    }
    c
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A configuration file in `dir` with `text`, on a Redis key prefix of its own.
fn config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("r2f.toml");
    let prefix = unique("cliops");
    std::fs::write(&path, format!("[redis]\nkey_prefix = \"{prefix}\"\n{text}")).unwrap();
    path
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    let o = r2f().args(["generate", "--prompt", "x"]).output().unwrap();
    assert_eq!(code(&o), Some(64), "{}", stderr(&o));
    let o = r2f().arg("no-such-command").output().unwrap();
    assert_eq!(code(&o), Some(64), "{}", stderr(&o));
    let o = r2f().arg("--help").output().unwrap();
    assert_eq!(code(&o), Some(0));
    assert!(stdout(&o).contains("replay"), "{}", stdout(&o));
    // An output whose extension names no format: refused before any loading.
    let o = r2f()
        .args(["generate", "--prompt", "a frog", "--model", "/nonexistent"])
        .args(["--out", "/tmp/r2f-never.gif"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains(".jpg"), "{}", stderr(&o));
}

#[test]
fn a_job_a_worker_would_reject_exits_65() {
    let model = model_dir("sd3-tiny-a");
    let o = r2f()
        .args([
            "generate", "--prompt", "a frog", "--device", "cpu", "--width", "40",
        ])
        .args([
            "--model",
            model.to_str().unwrap(),
            "--out",
            "/tmp/r2f-never.png",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(65), "{}", stderr(&o));
    assert!(stderr(&o).contains("multiple of 16"), "{}", stderr(&o));
}

#[test]
fn generate_writes_the_format_its_out_extension_names() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir("sd3-tiny-a");
    for (name, magic) in [
        ("a.jpg", &b"\xFF\xD8\xFF"[..]),
        ("b.JPEG", &b"\xFF\xD8\xFF"[..]),
        ("c.webp", &b"RIFF"[..]),
        ("d.png", &b"\x89PNG"[..]),
    ] {
        let out = dir.path().join(name);
        let o = r2f()
            .args([
                "generate", "--prompt", "a frog", "--device", "cpu", "--steps", "1",
            ])
            .args(["--model", model.to_str().unwrap()])
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(code(&o), Some(0), "{name}: {}", stderr(&o));
        let bytes = std::fs::read(&out).unwrap();
        assert!(bytes.starts_with(magic), "{name}: {:?}", &bytes[..8]);
        // Marked as AI-generated, read back by Pillow and Python's XML parser.
        let read = Command::new(common::venv_python())
            .args(["-c", READ_XMP])
            .arg(&out)
            .output()
            .unwrap();
        assert!(read.status.success(), "{name}: {}", stderr(&read));
        let fields: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
        assert_eq!(
            fields["DigitalSourceType"],
            "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia",
            "{name}: {fields}"
        );
        assert!(
            fields["CreatorTool"].as_str().unwrap().starts_with("r2f "),
            "{name}: {fields}"
        );
        assert_eq!(fields["prompt"], "a frog", "{name}: {fields}");
        // r2f inspect reads the same fields back from every format.
        let o = r2f().arg("inspect").arg(&out).output().unwrap();
        assert_eq!(code(&o), Some(0), "{name}: {}", stderr(&o));
        let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(meta["prompt"], "a frog", "{name}: {meta}");
        assert_eq!(meta["steps"], 1, "{name}: {meta}");
        assert_eq!(meta["scheduler"], "flow-match-euler", "{name}: {meta}");
        assert_eq!(meta["model_family"], "sd3", "{name}: {meta}");
        assert_eq!(meta["ai_generated"], true, "{name}: {meta}");
    }
    // The PNG also carries AUTOMATIC1111's `parameters` chunk, read here by Pillow.
    let read = Command::new(common::venv_python())
        .args([
            "-c",
            "import sys; from PIL import Image; print(Image.open(sys.argv[1]).info['parameters'])",
        ])
        .arg(dir.path().join("d.png"))
        .output()
        .unwrap();
    let params = stdout(&read);
    assert!(params.starts_with("a frog\n"), "{params}");
    assert!(
        params.contains("Steps: 1, Sampler: flow-match-euler, CFG scale: "),
        "{params}"
    );
    assert!(params.contains("Size: "), "{params}");
    // A file without r2f metadata is bad data.
    let plain = dir.path().join("plain.txt");
    std::fs::write(&plain, "hello").unwrap();
    let o = r2f().arg("inspect").arg(&plain).output().unwrap();
    assert_eq!(code(&o), Some(65), "{}", stderr(&o));
}

#[test]
fn generate_from_an_image_makes_the_same_bytes_again_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    std::fs::write(
        &plan,
        r#"{"visual_detail_level": ["3", "1"], "r2f_prompt": [["a furry animal warrior", "a furry frog warrior", "a frog warrior"]]}"#,
    )
    .unwrap();
    let sd3 = model_dir("sd3-tiny-a");
    let sdxl = model_dir("sdxl-tiny-a");
    // An R2F run (plan, prompt schedule, stop-step map, T5 length) in each format, and a plain
    // SDXL run with a scheduler other than its default.
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("r2f.png", vec![]),
        ("r2f.jpg", vec!["--quality".into(), "71".into()]),
        ("r2f.webp", vec![]),
        ("sdxl.png", vec![]),
    ];
    for (name, extra) in cases {
        let out = dir.path().join(name);
        let mut cmd = r2f();
        cmd.args(["generate", "--device", "cpu", "--steps", "4", "--seed", "7"])
            .args(["--width", "32", "--height", "48"])
            .args(["--negative-prompt", "blurry <ugly> & \"dark\""])
            .args(&extra)
            .arg("--out")
            .arg(&out);
        if name.starts_with("sdxl") {
            cmd.args(["--prompt", "a frog", "--scheduler", "dpm++2m-karras"])
                .arg("--model")
                .arg(&sdxl);
        } else {
            cmd.args(["--prompt", "a furry frog warrior", "--t5-tokens", "19"])
                .arg("--model")
                .arg(&sd3)
                .arg("--plan")
                .arg(&plan);
        }
        let o = cmd.output().unwrap();
        assert_eq!(code(&o), Some(0), "{name}: {}", stderr(&o));
        let first = std::fs::read(&out).unwrap();

        // The record, typed.
        let o = r2f().arg("inspect").arg(&out).output().unwrap();
        assert_eq!(code(&o), Some(0), "{name}: {}", stderr(&o));
        let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(meta["seed"], 7, "{meta}");
        assert_eq!(meta["width"], 32, "{meta}");
        assert_eq!(meta["height"], 48, "{meta}");
        assert_eq!(meta["dtype"], "fp32", "{meta}");
        assert_eq!(meta["device"], "cpu", "{meta}");
        assert_eq!(meta["r2f_version"], env!("CARGO_PKG_VERSION"), "{meta}");
        let hash = meta["weights_hash"].as_str().unwrap();
        assert!(
            hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
            "{meta}"
        );
        if name.starts_with("sdxl") {
            assert_eq!(meta["scheduler"], "dpm++2m-karras", "{meta}");
            assert_eq!(meta["model_family"], "sdxl", "{meta}");
            assert!(meta.get("t5_tokens").is_none(), "{meta}");
        } else {
            assert_eq!(meta["mode"], "r2f", "{meta}");
            assert_eq!(meta["t5_tokens"], 19, "{meta}");
            assert_eq!(meta["schedule"], "faithful", "{meta}");
            assert_eq!(
                meta["stop_steps"],
                serde_json::json!([0, 5, 10, 20, 30, 40])
            );
            assert_eq!(
                meta["prompt_schedule"].as_array().unwrap().len(),
                4,
                "{meta}"
            );
            assert_eq!(
                meta["plan"]["r2f_prompt"][0][0], "a furry animal warrior",
                "{meta}"
            );
        }
        if name.ends_with(".jpg") {
            assert_eq!(meta["quality"], 71, "{meta}");
        }

        // Made again from the file alone, in the same format: the same bytes.
        let again = dir.path().join(format!("again-{name}"));
        let o = r2f()
            .args(["generate", "--from"])
            .arg(&out)
            .arg("--out")
            .arg(&again)
            .output()
            .unwrap();
        assert_eq!(code(&o), Some(0), "{name}: {}", stderr(&o));
        assert!(
            std::fs::read(&again).unwrap() == first,
            "{name}: --from did not make the same bytes"
        );
    }

    // --format overrides the extension; the record then says the format's quality.
    let webp = dir.path().join("as-webp.img");
    let o = r2f()
        .args(["generate", "--format", "webp", "--quality", "55", "--from"])
        .arg(dir.path().join("r2f.png"))
        .arg("--out")
        .arg(&webp)
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(0), "{}", stderr(&o));
    let bytes = std::fs::read(&webp).unwrap();
    assert_eq!(&bytes[8..12], b"WEBP");
    let o = r2f().arg("inspect").arg(&webp).output().unwrap();
    let meta: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(meta["quality"], 55, "{meta}");

    // Generation options do not mix with --from; a file without a record is bad data.
    let o = r2f()
        .args(["generate", "--seed", "3", "--from"])
        .arg(dir.path().join("r2f.png"))
        .args(["--out", "/tmp/r2f-never.png"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(64), "{}", stderr(&o));
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let o = r2f()
        .args(["generate", "--from"])
        .arg(&junk)
        .args(["--out", "/tmp/r2f-never.png"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(65), "{}", stderr(&o));
}

/// Prints the XMP of an image (PNG, JPEG or WebP, as Pillow exposes it) as JSON: the IPTC
/// source type, the creator tool and r2f's own fields, parsed with xml.etree.
const READ_XMP: &str = r#"
import json, sys
import xml.etree.ElementTree as ET
from PIL import Image
im = Image.open(sys.argv[1])
raw = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
if isinstance(raw, bytes):
    raw = raw.decode("utf-8")
root = ET.fromstring(raw[raw.index("<x:xmpmeta"):raw.index("</x:xmpmeta>") + len("</x:xmpmeta>")])
out = {}
for el in root.iter():
    ns, _, local = el.tag[1:].partition("}")
    if ns == "http://iptc.org/std/Iptc4xmpExt/2008-02-29/" and local == "DigitalSourceType":
        out["DigitalSourceType"] = el.text
    elif ns == "http://ns.adobe.com/xap/1.0/" and local == "CreatorTool":
        out["CreatorTool"] = el.text
    elif ns == "urn:r2f:metadata:1/":
        out[local] = el.text
print(json.dumps(out))
"#;

#[test]
fn an_unknown_key_stops_the_load_naming_the_key_and_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = config(dir.path(), "[worker]\nprefech = 2\n");
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .args(["config", "check", "--no-probe"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(78), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("worker.prefech"), "{e}");
    assert!(e.contains(file.to_str().unwrap()), "{e}");

    let file = config(dir.path(), "");
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .env("R2F__WORKER__PREFECH", "2")
        .args(["config", "check", "--no-probe"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(78), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("R2F__WORKER__PREFECH"),
        "{}",
        stderr(&o)
    );
    // The worker does not start either.
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .env("R2F__AMQP__URLL", "amqp://x")
        .arg("worker")
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("R2F__AMQP__URLL"), "{}", stderr(&o));
}

#[test]
fn lists_and_url_files_come_from_the_environment_and_secrets_are_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("amqp-url");
    std::fs::write(&secret, "amqp://guest:guest@127.0.0.1:5672/%2f\n").unwrap();
    let file = config(dir.path(), "");
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .env(
            "R2F__WEBHOOK__ALLOWED_HOSTS",
            "hooks.a.example, *.b.example",
        )
        .env("R2F__WEBHOOK__ALLOWED_PORTS", "8443,9443")
        .env("R2F__TENANCY__MODE", "multi")
        .env("R2F__TENANTS__ACME__USERS", "acme-1,acme-2")
        .env("R2F__AMQP__URL_FILE", &secret)
        .env("R2F__REDIS__URL", "redis://:hunter2@127.0.0.1:6379")
        .args(["config", "check", "--no-probe"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains(r#"allowed_hosts = ["hooks.a.example", "*.b.example"]"#),
        "{out}"
    );
    assert!(
        out.contains("allowed_ports = [8443, 9443]")
            || out.contains(r#"allowed_ports = ["8443", "9443"]"#),
        "{out}"
    );
    assert!(out.contains(r#"users = ["acme-1", "acme-2"]"#), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    assert!(out.contains("redis://:***@127.0.0.1:6379"), "{out}");
    // An empty value is an empty list.
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .env("R2F__WEBHOOK__ALLOWED_HOSTS", "")
        .args(["config", "check", "--no-probe"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("allowed_hosts = []"), "{}", stdout(&o));
    // A URL file that cannot be read stops the load.
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .env("R2F__REDIS__URL_FILE", dir.path().join("absent"))
        .args(["config", "check", "--no-probe"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("redis.url_file"), "{}", stderr(&o));
}

#[test]
fn config_check_probes_every_dependency_and_exits_69_when_one_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("amqp-url");
    std::fs::write(&secret, "amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
    let store = dir.path().join("store");
    let file = config(
        dir.path(),
        &format!(
            "[amqp]\nurl_file = {:?}\n[storage]\nbackend = \"local\"\nlocal_dir = {:?}\n\
             [llm]\nenabled = false\n[models.tiny]\nsource = {:?}\n[worker]\nmodel = \"tiny\"\n",
            secret.to_str().unwrap(),
            store.to_str().unwrap(),
            model_dir("sd3-tiny-a").to_str().unwrap()
        ),
    );
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .args(["config", "check"])
        .output()
        .unwrap();
    let out = stdout(&o);
    assert_eq!(code(&o), Some(0), "{out}\n{}", stderr(&o));
    for name in ["broker", "redis", "storage", "model"] {
        assert!(
            out.lines().any(|l| l.starts_with("ok") && l.contains(name)),
            "{name}: {out}"
        );
    }
    assert!(!out.contains("guest:guest"), "{out}");
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .env("R2F__REDIS__URL", "redis://127.0.0.1:1")
        .args(["config", "check"])
        .output()
        .unwrap();
    let out = stdout(&o);
    assert_eq!(code(&o), Some(69), "{out}\n{}", stderr(&o));
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("redis")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok") && l.contains("broker")),
        "{out}"
    );
}

#[test]
fn r2f_mode_without_the_configured_key_says_so_before_any_request() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = config(
        dir.path(),
        &format!(
            "[llm]\nenabled = true\nbase_url = \"http://{}/v1\"\napi_key_env = \"R2F_TEST_ABSENT_KEY\"\n",
            listener.local_addr().unwrap()
        ),
    );
    let model = model_dir("sd3-tiny-a");
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .env_remove("R2F_TEST_ABSENT_KEY")
        .args([
            "generate",
            "--prompt",
            "a furry frog",
            "--mode",
            "r2f",
            "--device",
            "cpu",
        ])
        .args(["--model", model.to_str().unwrap(), "--out"])
        .arg(dir.path().join("x.png"))
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(78), "{}", stderr(&o));
    assert!(stderr(&o).contains("R2F_TEST_ABSENT_KEY"), "{}", stderr(&o));
    assert!(
        listener.accept().is_err(),
        "no request reached the LLM's address"
    );
}

#[test]
fn cancel_of_an_unknown_job_records_nothing_and_wait_times_out_with_75() {
    let dir = tempfile::tempdir().unwrap();
    let file = config(dir.path(), "");
    let prefix = std::fs::read_to_string(&file).unwrap();
    let prefix = prefix
        .lines()
        .find_map(|l| l.strip_prefix("key_prefix = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .args(["cancel", "never-submitted"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(65), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no job `never-submitted`"),
        "{}",
        stderr(&o)
    );
    let redis = local_redis(&prefix);
    let key = r2f::service::tenancy::JobKey::single("never-submitted");
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert!(!rt.block_on(r2f::service::status::cancel_requested(&redis, &key)));
    // --force records it (a job published straight to the broker).
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .args(["cancel", "never-submitted", "--force"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(0), "{}", stderr(&o));
    assert!(rt.block_on(r2f::service::status::cancel_requested(&redis, &key)));
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .args(["wait", "never-submitted", "--timeout", "0.3"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(75), "{}", stderr(&o));
    // Redis down: a dependency, 69.
    let o = r2f()
        .arg("--config")
        .arg(&file)
        .env("R2F__REDIS__URL", "redis://127.0.0.1:1")
        .args(["cancel", "never-submitted"])
        .output()
        .unwrap();
    assert_eq!(code(&o), Some(69), "{}", stderr(&o));
}
