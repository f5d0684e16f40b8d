//! Storing a job's outputs: its images (each uploaded, then optionally given a presigned URL) and
//! its `result.json`, each PUT retried in-process with backoff within
//! `storage.retry_budget_secs` — generated images are not thrown away, nor generated again,
//! because the store blinked.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tracing::warn;

use super::context::Context;
use super::gpu::{ms, GeneratedImage};
use super::outcome::{Fault, JobError};
use crate::job::{ErrorKind, OutputImage, ResultEvent, ValidJob};
use crate::service::storage::{join_key, StorageError};

/// Writes the job's final event as its `result.json` (within the storage retry budget).
pub async fn store_result(ctx: &Context, key: &str, event: &ResultEvent) -> Result<(), JobError> {
    let body = serde_json::to_vec_pretty(event)
        .map_err(|e| JobError::new(ErrorKind::Internal, Fault::Worker, e.to_string()))?;
    put_with_budget(ctx, key, body, "application/json").await?;
    Ok(())
}

pub fn storage_error(e: StorageError) -> JobError {
    let fault = if e.is_denied() {
        Fault::Worker
    } else {
        Fault::Transient
    };
    JobError::new(ErrorKind::Storage, fault, e.0)
}

/// Uploads each image, retrying each within the storage retry budget.
pub async fn upload<'a>(
    ctx: &Context,
    job: &ValidJob,
    result_key: &str,
    images: impl Iterator<Item = &'a GeneratedImage>,
) -> Result<Vec<OutputImage>, JobError> {
    // The images go next to the job's result.json.
    let folder = result_key.rsplit_once('/').map_or("", |(f, _)| f);
    let mut outputs = Vec::new();
    for (index, img) in images.enumerate() {
        let key = join_key(&[
            folder,
            &format!("{index}.{}", job.encoding.format.extension()),
        ]);
        let content_type = job.encoding.format.content_type();
        let uri = put_with_budget(ctx, &key, img.bytes.clone(), content_type).await?;
        let ttl = ctx.settings.storage.presign_ttl_secs;
        let url = if ttl > 0 {
            // Signing is local; a failure costs the URL, not the job.
            match ctx
                .storage
                .presigned_get(&key, Duration::from_secs(ttl))
                .await
            {
                Ok(url) => url,
                Err(e) => {
                    warn!(error = %e.0, "no presigned URL");
                    None
                }
            }
        } else {
            None
        };
        outputs.push(OutputImage {
            uri,
            width: img.width,
            height: img.height,
            sha256: hex::encode(Sha256::digest(&img.bytes)),
            url,
            metadata: Some(img.record.clone()),
        });
    }
    Ok(outputs)
}

/// One PUT, retried in-process with backoff for up to `storage.retry_budget_secs`: generated
/// images are not thrown away (nor generated again) because the store blinked.
async fn put_with_budget(
    ctx: &Context,
    key: &str,
    bytes: Vec<u8>,
    content_type: &str,
) -> Result<String, JobError> {
    let budget = Duration::from_secs(ctx.settings.storage.retry_budget_secs);
    let start = Instant::now();
    let mut backoff = crate::service::backoff::Backoff::new(
        Duration::from_millis(250),
        Duration::from_secs(10),
        Duration::MAX,
    );
    loop {
        match ctx.storage.put(key, bytes.clone(), content_type).await {
            Ok(uri) => return Ok(uri),
            Err(e) if e.is_denied() => return Err(storage_error(e)),
            Err(e) => {
                let wait = backoff.next_delay();
                if start.elapsed() + wait > budget {
                    return Err(storage_error(e));
                }
                ctx.metrics
                    .storage_retries
                    .with_label_values(&["put"])
                    .inc();
                warn!(error = %e.0, retry_in_ms = ms(wait), "upload failed; retrying");
                tokio::time::sleep(wait).await;
            }
        }
    }
}
