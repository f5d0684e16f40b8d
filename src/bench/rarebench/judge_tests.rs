use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::*;

const KEY: &str = "sk-judge-test";
/// The smallest PNG signature plus filler: the judge only sniffs and encodes the bytes.
const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR-not-a-real-image";

#[derive(Clone, Debug)]
enum Reply {
    Answer(&'static str),
    /// A status, with the headers to send (e.g. Retry-After).
    Status(u16, Vec<(&'static str, &'static str)>),
    /// A 200 that is no chat completion.
    Garbage,
}

#[derive(Default)]
struct Stand {
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<(Instant, Value)>>,
}

/// A local stand-in for an OpenAI-compatible vision endpoint: checks the key and the message
/// shape, then replies as scripted (a good answer once the script is spent).
async fn chat(
    State(s): State<Arc<Stand>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    s.requests
        .lock()
        .unwrap()
        .push((Instant::now(), body.clone()));
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {KEY}"))
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"message": "bad key"}})),
        )
            .into_response();
    }
    let content = &body["messages"][0]["content"];
    if content[0]["type"] != "text" || content[1]["type"] != "image_url" {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "bad message"}})),
        )
            .into_response();
    }
    let reply = s.script.lock().unwrap().pop_front();
    let text = match reply {
        None => "### SCORE: 4\n### EXPLANATION: A furry kettle, but only one lemon is striped.",
        Some(Reply::Answer(t)) => t,
        Some(Reply::Garbage) => return "<html>proxy error</html>".into_response(),
        Some(Reply::Status(code, hs)) => {
            let mut r = (
                StatusCode::from_u16(code).unwrap(),
                Json(json!({"error": {"message": "scripted", "type": "rate_limit"}})),
            )
                .into_response();
            for (k, v) in hs {
                r.headers_mut().insert(k, v.parse().unwrap());
            }
            return r;
        }
    };
    Json(json!({
        "id": "chatcmpl-judge",
        "object": "chat.completion",
        "model": "gpt-4o-2024-05-13",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1105, "completion_tokens": 31, "total_tokens": 1136}
    }))
    .into_response()
}

async fn stand(script: Vec<Reply>) -> (Arc<Stand>, String) {
    let s = Arc::new(Stand::default());
    s.script.lock().unwrap().extend(script);
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(chat))
        .with_state(s.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (s, format!("http://{addr}/v1"))
}

fn settings(base_url: String) -> JudgeSettings {
    JudgeSettings {
        base_url,
        api_key: Some(KEY.into()),
        max_attempts: 3,
        max_reasks: 2,
        retry_backoff: Duration::from_millis(10),
        max_retry_wait: Duration::from_secs(5),
        ..JudgeSettings::default()
    }
}

#[test]
fn answers_parse_as_the_official_format_with_forgiven_decoration() {
    let v = parse_answer("### SCORE: 4\n### EXPLANATION: The frog is furry but not a warrior.")
        .unwrap();
    assert_eq!(v.score, 4);
    assert_eq!(v.explanation, "The frog is furry but not a warrior.");
    // One line, as the official split reads it too.
    let v = parse_answer("### SCORE: 5 ### EXPLANATION: Perfect.").unwrap();
    assert_eq!((v.score, v.explanation.as_str()), (5, "Perfect."));
    // Bold, lower case, other header depth, "4/5", code fences, prose around.
    for text in [
        "**### SCORE:** **3**\n**### EXPLANATION:** Some parts missing.",
        "Here is my evaluation.\n## score: 3\n## explanation: Some parts missing.\n",
        "```\n### SCORE: 3/5\n### EXPLANATION: Some parts missing.\n```",
        "### Score 3\n### Explanation - Some parts missing.",
    ] {
        let v = parse_answer(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(v.score, 3, "{text:?}");
        assert!(v.explanation.contains("Some parts missing."), "{text:?}");
    }
    assert_eq!(
        parse_answer("### SCORE: 0\n### EXPLANATION: ")
            .unwrap()
            .score,
        0
    );
    // The same score twice is fine.
    assert_eq!(
        parse_answer("### SCORE: 2\n### EXPLANATION: x\n### SCORE: 2")
            .unwrap()
            .score,
        2
    );
}

#[test]
fn malformed_answers_are_refused_with_a_reason() {
    for (text, why) in [
        ("", "no ### EXPLANATION"),
        ("I would rate this image 4 out of 5.", "no ### EXPLANATION"),
        ("### SCORE: 4", "no ### EXPLANATION"),
        ("### EXPLANATION: good", "no ### SCORE"),
        (
            "### SCORE: 4.5\n### EXPLANATION: x",
            "`4.5` is not a whole number",
        ),
        (
            "### SCORE: 7\n### EXPLANATION: x",
            "`7` is not a whole number",
        ),
        (
            "### SCORE: -1\n### EXPLANATION: x",
            "`-1` is not a whole number",
        ),
        ("### SCORE: four\n### EXPLANATION: x", "`four`"),
        ("### SCORE:\n### EXPLANATION: x", "`` is not"),
        (
            "### SCORE: 3\n### SCORE: 5\n### EXPLANATION: x",
            "two scores, 3 and 5",
        ),
    ] {
        let e = parse_answer(text).unwrap_err();
        assert!(e.contains(why), "{text:?}: {e}");
    }
}

#[test]
fn retry_after_reads_seconds_milliseconds_and_dates() {
    use reqwest::header::{HeaderMap, HeaderValue};
    let now = chrono::DateTime::parse_from_rfc3339("2025-06-01T12:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let h = |pairs: &[(&'static str, &str)]| {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    };
    assert_eq!(
        retry_after(&h(&[("retry-after", "7")]), now),
        Some(Duration::from_secs(7))
    );
    assert_eq!(
        retry_after(&h(&[("retry-after", "1.5")]), now),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(
        retry_after(&h(&[("retry-after", "3"), ("retry-after-ms", "250")]), now),
        Some(Duration::from_millis(250))
    );
    assert_eq!(
        retry_after(&h(&[("retry-after", "Sun, 01 Jun 2025 12:00:30 GMT")]), now),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        retry_after(&h(&[("retry-after", "Sun, 01 Jun 2025 11:59:00 GMT")]), now),
        None
    );
    assert_eq!(retry_after(&h(&[("retry-after", "soon")]), now), None);
    assert_eq!(retry_after(&h(&[("retry-after", "-3")]), now), None);
    assert_eq!(retry_after(&h(&[]), now), None);
}

#[test]
fn the_request_is_one_user_message_with_the_prompt_and_a_data_url() {
    let j = Judge::new(settings("http://127.0.0.1:9/v1".into())).unwrap();
    let body = j.request_body("a furry kettle", PNG).unwrap();
    assert_eq!(body["model"], OFFICIAL_MODEL);
    assert_eq!(body["max_tokens"], 4096);
    assert!(
        body.get("temperature").is_none(),
        "the API's default sampling"
    );
    let msgs = body["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["role"], "user");
    let text = msgs[0]["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("\"a furry kettle\""), "{text}");
    assert!(
        text.ends_with("### SCORE: score\n### EXPLANATION: explanation"),
        "{text}"
    );
    let url = msgs[0]["content"][1]["image_url"]["url"].as_str().unwrap();
    let b64 = url.strip_prefix("data:image/png;base64,").unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
        PNG
    );

    let j = Judge::new(JudgeSettings {
        image_mime: ImageMime::AlwaysJpeg,
        temperature: Some(0.0),
        ..settings("http://127.0.0.1:9/v1".into())
    })
    .unwrap();
    let body = j.request_body("x", PNG).unwrap();
    assert!(body["messages"][0]["content"][1]["image_url"]["url"]
        .as_str()
        .unwrap()
        .starts_with("data:image/jpeg;base64,"));
    assert_eq!(body["temperature"], 0.0);
    assert!(j
        .request_body("x", b"GIF89a")
        .unwrap_err()
        .contains("not PNG, JPEG or WebP"));
}

#[test]
fn a_prompt_file_is_used_verbatim_and_needs_the_placeholder() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("judge.txt");
    std::fs::write(&p, "Rate \"{prompt}\" please.\n### SCORE: score").unwrap();
    let s = JudgeSettings::default().with_prompt_file(&p).unwrap();
    assert_eq!(
        s.prompt_for("a cat"),
        "Rate \"a cat\" please.\n### SCORE: score"
    );
    std::fs::write(&p, "Rate it.").unwrap();
    let e = JudgeSettings::default().with_prompt_file(&p).unwrap_err();
    assert!(e.contains("no {prompt} placeholder"), "{e}");
    assert!(Judge::new(JudgeSettings {
        prompt_template: "x".into(),
        ..JudgeSettings::default()
    })
    .is_err());
}

#[tokio::test]
async fn a_good_answer_is_one_request() {
    let (s, url) = stand(vec![]).await;
    let j = Judge::new(settings(url)).unwrap();
    let got = j
        .judge("a furry kettle and two striped lemons", PNG)
        .await
        .unwrap();
    assert_eq!(got.score, 4);
    assert_eq!(
        got.explanation,
        "A furry kettle, but only one lemon is striped."
    );
    assert_eq!((got.requests, got.malformed), (1, 0));
    assert_eq!(got.model, "gpt-4o-2024-05-13");
    assert_eq!(
        got.usage,
        Usage {
            prompt_tokens: 1105,
            completion_tokens: 31,
            total_tokens: 1136
        }
    );
    let reqs = s.requests.lock().unwrap();
    let text = reqs[0].1["messages"][0]["content"][0]["text"]
        .as_str()
        .unwrap();
    assert!(text.contains("\"a furry kettle and two striped lemons\""));
}

#[tokio::test]
async fn malformed_answers_are_asked_again_counted_and_billed() {
    let (_s, url) = stand(vec![
        Reply::Answer("I'd give it a 4."),
        Reply::Answer("### SCORE: 4.5\n### EXPLANATION: close"),
    ])
    .await;
    let j = Judge::new(settings(url)).unwrap();
    let got = j.judge("p", PNG).await.unwrap();
    assert_eq!((got.score, got.requests, got.malformed), (4, 3, 2));
    assert_eq!(got.usage.total_tokens, 3 * 1136);

    let (_s, url) = stand(vec![Reply::Answer("no"); 3]).await;
    let j = Judge::new(settings(url)).unwrap();
    let e = j.judge("p", PNG).await.unwrap_err();
    assert_eq!(e.kind, JudgeErrorKind::Malformed);
    assert_eq!(
        (e.requests, e.malformed, e.usage.total_tokens),
        (3, 3, 3 * 1136)
    );
    assert!(
        e.message.contains("stayed malformed after 3 tries"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_honouring_retry_after() {
    let (s, url) = stand(vec![
        Reply::Status(429, vec![("retry-after", "1")]),
        Reply::Status(503, vec![]),
        Reply::Status(429, vec![("retry-after-ms", "300")]),
    ])
    .await;
    let j = Judge::new(JudgeSettings {
        max_attempts: 4,
        ..settings(url)
    })
    .unwrap();
    let got = j.judge("p", PNG).await.unwrap();
    assert_eq!((got.score, got.requests, got.malformed), (4, 4, 0));
    let at: Vec<Instant> = s.requests.lock().unwrap().iter().map(|r| r.0).collect();
    assert!(
        at[1] - at[0] >= Duration::from_millis(990),
        "{:?}",
        at[1] - at[0]
    );
    assert!(
        at[3] - at[2] >= Duration::from_millis(290),
        "{:?}",
        at[3] - at[2]
    );

    // Retry-After is capped by max_retry_wait.
    let (s, url) = stand(vec![Reply::Status(429, vec![("retry-after", "3600")])]).await;
    let j = Judge::new(JudgeSettings {
        max_retry_wait: Duration::from_millis(50),
        ..settings(url)
    })
    .unwrap();
    let started = Instant::now();
    j.judge("p", PNG).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(s.requests.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn failures_that_outlast_the_tries_or_refuse_the_client_are_errors() {
    let (s, url) = stand(vec![Reply::Status(500, vec![]); 5]).await;
    let j = Judge::new(settings(url.clone())).unwrap();
    let e = j.judge("p", PNG).await.unwrap_err();
    assert_eq!(e.kind, JudgeErrorKind::Unavailable);
    assert_eq!(e.requests, 3);
    assert!(
        e.message.contains("HTTP 500") && e.message.contains("after 3 tries"),
        "{}",
        e.message
    );
    assert_eq!(s.requests.lock().unwrap().len(), 3);

    // A wrong key: refused at once, no retry.
    let j = Judge::new(JudgeSettings {
        api_key: Some("sk-wrong".into()),
        ..settings(url.clone())
    })
    .unwrap();
    let e = j.judge("p", PNG).await.unwrap_err();
    assert_eq!((e.kind, e.requests), (JudgeErrorKind::Refused, 1));

    let (_s, url) = stand(vec![Reply::Status(400, vec![])]).await;
    let e = Judge::new(settings(url))
        .unwrap()
        .judge("p", PNG)
        .await
        .unwrap_err();
    assert_eq!((e.kind, e.requests), (JudgeErrorKind::Failed, 1));

    let (_s, url) = stand(vec![Reply::Garbage]).await;
    let e = Judge::new(settings(url))
        .unwrap()
        .judge("p", PNG)
        .await
        .unwrap_err();
    assert_eq!(e.kind, JudgeErrorKind::Failed);
    assert!(e.message.contains("not a chat completion"), "{}", e.message);

    // Nobody listening: unavailable after the tries.
    let e = Judge::new(settings("http://127.0.0.1:9/v1".into()))
        .unwrap()
        .judge("p", PNG)
        .await
        .unwrap_err();
    assert_eq!((e.kind, e.requests), (JudgeErrorKind::Unavailable, 3));
}
