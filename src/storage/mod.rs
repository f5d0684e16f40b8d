//! Where images and result files go: one trait, an S3 backend (aws-sdk-s3) and a local-folder
//! backend with the same key layout (`<prefix>/<job id>/<index>.png`, `<job id>/result.json`).

use std::path::PathBuf;

use async_trait_free::BoxFuture;

use crate::config::StorageSettings;

/// Minimal boxed-future alias so the trait stays object safe without extra crates.
mod async_trait_free {
    pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StorageError(pub String);

pub trait Storage: Send + Sync {
    /// Stores `bytes` at `key`; returns the object's URI.
    fn put<'a>(
        &'a self,
        key: &'a str,
        bytes: Vec<u8>,
        content_type: &'a str,
    ) -> BoxFuture<'a, Result<String, StorageError>>;
    /// The object at `key`, or None when absent.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StorageError>>;
    /// The URI an object at `key` has.
    fn uri(&self, key: &str) -> String;
}

/// Joins key segments with '/', skipping empty ones.
pub fn join_key(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        std::fs::create_dir_all(&root)
            .map_err(|e| StorageError(format!("cannot create {}: {e}", root.display())))?;
        let root = root
            .canonicalize()
            .map_err(|e| StorageError(format!("cannot resolve {}: {e}", root.display())))?;
        Ok(Self { root })
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        if key.split('/').any(|s| s == ".." || s.is_empty()) {
            return Err(StorageError(format!("invalid storage key `{key}`")));
        }
        Ok(self.root.join(key))
    }
}

impl Storage for LocalStorage {
    fn put<'a>(
        &'a self,
        key: &'a str,
        bytes: Vec<u8>,
        _content_type: &'a str,
    ) -> BoxFuture<'a, Result<String, StorageError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            let p = path.clone();
            tokio::task::spawn_blocking(move || crate::image::write_atomic(&p, &bytes))
                .await
                .map_err(|e| StorageError(e.to_string()))?
                .map_err(|e| StorageError(format!("cannot write {}: {e}", path.display())))?;
            Ok(self.uri(key))
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StorageError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::read(&path).await {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StorageError(format!("cannot read {}: {e}", path.display()))),
            }
        })
    }

    fn uri(&self, key: &str) -> String {
        format!("file://{}", self.root.join(key).display())
    }
}

pub struct S3Storage {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Storage {
    pub async fn new(s: &StorageSettings) -> Result<Self, StorageError> {
        use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(Region::new(s.s3.region.clone()))
            .load()
            .await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(s.s3.force_path_style)
            .region(Region::new(s.s3.region.clone()));
        if !s.s3.endpoint.is_empty() {
            b = b.endpoint_url(&s.s3.endpoint);
        }
        if !s.s3.request_checksums {
            b = b
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: s.bucket.clone(),
        })
    }
}

fn s3_error<E: std::error::Error + 'static>(what: &str, key: &str, e: E) -> StorageError {
    // DisplayErrorContext gives the whole chain (service code, HTTP failure) without secrets.
    StorageError(format!(
        "S3 {what} of `{key}` failed: {}",
        aws_sdk_s3::error::DisplayErrorContext(e)
    ))
}

impl Storage for S3Storage {
    fn put<'a>(
        &'a self,
        key: &'a str,
        bytes: Vec<u8>,
        content_type: &'a str,
    ) -> BoxFuture<'a, Result<String, StorageError>> {
        Box::pin(async move {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_type(content_type)
                .body(bytes.into())
                .send()
                .await
                .map_err(|e| s3_error("PUT", key, e))?;
            Ok(self.uri(key))
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StorageError>> {
        Box::pin(async move {
            match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(out) => {
                    let data = out
                        .body
                        .collect()
                        .await
                        .map_err(|e| StorageError(format!("S3 GET of `{key}` failed: {e}")))?;
                    Ok(Some(data.into_bytes().to_vec()))
                }
                Err(e) => {
                    let not_found = e
                        .as_service_error()
                        .map(|s| s.is_no_such_key())
                        .unwrap_or(false)
                        || e.raw_response()
                            .map(|r| r.status().as_u16() == 404)
                            .unwrap_or(false);
                    if not_found {
                        Ok(None)
                    } else {
                        Err(s3_error("GET", key, e))
                    }
                }
            }
        })
    }

    fn uri(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, key)
    }
}

/// The backend the settings name.
pub async fn from_settings(s: &StorageSettings) -> Result<Box<dyn Storage>, StorageError> {
    match s.backend.as_str() {
        "s3" => Ok(Box::new(S3Storage::new(s).await?)),
        _ => Ok(Box::new(LocalStorage::new(&s.local_dir)?)),
    }
}
