//! Where images and result files go: one trait, an S3 backend (aws-sdk-s3) and a local-folder
//! backend with the same key layout (`<prefix>/<job id>/<index>.png`, `<job id>/result.json`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait_free::BoxFuture;
use aws_sdk_s3::config::http::{HttpRequest, HttpResponse};
use aws_sdk_s3::config::{HttpClient, RuntimeComponents};
use aws_sdk_s3::primitives::SdkBody;
use aws_smithy_runtime_api::client::http::{
    HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::result::ConnectorError;

use crate::config::StorageSettings;

/// Minimal boxed-future alias so the trait stays object safe without extra crates.
mod async_trait_free {
    pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
}

/// A storage failure. `Denied::Yes` marks a refusal of this worker's credentials or
/// permissions (HTTP 401/403): retrying will not help, and it is not the job's fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StorageError(pub String, pub Denied);

/// Whether the store refused this worker's credentials or permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Denied {
    #[default]
    No,
    Yes,
}

impl StorageError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into(), Denied::No)
    }

    pub fn is_denied(&self) -> bool {
        self.1 == Denied::Yes
    }
}

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
    /// Removes the object at `key`; an absent object is no error.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>>;
    /// The URI an object at `key` has.
    fn uri(&self, key: &str) -> String;
    /// A URL that lets anyone holding it GET the object at `key` for `ttl`, without
    /// credentials; None where the backend has no such thing (a local folder).
    fn presigned_get<'a>(
        &'a self,
        _key: &'a str,
        _ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StorageError>> {
        Box::pin(async { Ok(None) })
    }
    /// Start-up check: the store is reachable, writable, and reports a missing object as
    /// missing (S3 without `s3:ListBucket` answers 403 instead, which would fail every job).
    fn check(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let probe = format!(".r2f-check/{}", uuid::Uuid::new_v4().simple());
            match self.get(&probe).await {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err(StorageError::new(format!(
                    "storage check: `{probe}` unexpectedly exists"
                ))),
                Err(e) if e.is_denied() => Err(StorageError(
                    format!(
                        "storage check: reading a missing object was refused ({e}); the worker \
                         needs s3:GetObject, s3:PutObject and s3:ListBucket on the bucket"
                    ),
                    Denied::Yes,
                )),
                Err(e) => Err(e),
            }
        })
    }
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
            .map_err(|e| StorageError::new(format!("cannot create {}: {e}", root.display())))?;
        let root = root
            .canonicalize()
            .map_err(|e| StorageError::new(format!("cannot resolve {}: {e}", root.display())))?;
        Ok(Self { root })
    }

    fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        if key.split('/').any(|s| s == ".." || s.is_empty()) {
            return Err(StorageError::new(format!("invalid storage key `{key}`")));
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
                .map_err(|e| StorageError::new(e.to_string()))?
                .map_err(|e| StorageError::new(format!("cannot write {}: {e}", path.display())))?;
            Ok(self.uri(key))
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, StorageError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::read(&path).await {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StorageError::new(format!(
                    "cannot read {}: {e}",
                    path.display()
                ))),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::remove_file(&path).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StorageError::new(format!(
                    "cannot remove {}: {e}",
                    path.display()
                ))),
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
        // The SDK (and its credential providers) speak HTTP through the process's TLS
        // configuration.
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(Region::new(s.s3.region.clone()))
            .http_client(S3Http::default())
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
        // Bound every call: a store that accepts connections and never answers must not hold a
        // job (and its GPU slot) forever.
        let attempt = std::time::Duration::from_secs(s.timeout_secs.max(1));
        b = b.timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .connect_timeout(std::time::Duration::from_secs(5).min(attempt))
                .operation_attempt_timeout(attempt)
                .operation_timeout(attempt * 3)
                .build(),
        );
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: s.bucket.clone(),
        })
    }
}

fn s3_error<E>(
    what: &str,
    key: &str,
    e: aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StorageError
where
    E: std::error::Error + Send + Sync + 'static,
{
    let denied = match e.raw_response().map(|r| r.status().as_u16()) {
        Some(401 | 403) => Denied::Yes,
        _ => Denied::No,
    };
    // DisplayErrorContext gives the whole chain (service code, HTTP failure) without secrets.
    StorageError(
        format!(
            "S3 {what} of `{key}` failed: {}",
            aws_sdk_s3::error::DisplayErrorContext(e)
        ),
        denied,
    )
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
                    let data =
                        out.body.collect().await.map_err(|e| {
                            StorageError::new(format!("S3 GET of `{key}` failed: {e}"))
                        })?;
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

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| s3_error("DELETE", key, e))
        })
    }

    fn uri(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, key)
    }

    fn presigned_get<'a>(
        &'a self,
        key: &'a str,
        ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StorageError>> {
        Box::pin(async move {
            // Signed locally with the worker's credentials: no request is made.
            let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl)
                .map_err(|e| StorageError::new(format!("presigning `{key}`: {e}")))?;
            let req = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .presigned(config)
                .await
                .map_err(|e| StorageError::new(format!("presigning `{key}`: {e}")))?;
            Ok(Some(req.uri().to_string()))
        })
    }
}

/// The S3 SDK's HTTP client: reqwest with the process's TLS configuration
/// ([`crate::service::tls`]: the system roots plus `tls.ca_file`, and the client certificate for
/// stores that require mutual TLS; the SDK's own client takes extra roots, but no client
/// certificate). One reqwest client (and its connection pool) per connector settings the SDK
/// asks for.
#[derive(Debug, Clone, Default)]
struct S3Http {
    connectors: Arc<Mutex<Vec<(ConnectorKey, SharedHttpConnector)>>>,
}

/// The connect and read timeouts of the SDK's connector settings.
type ConnectorKey = (Option<Duration>, Option<Duration>);

impl HttpClient for S3Http {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        _components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        let key = (settings.connect_timeout(), settings.read_timeout());
        let mut connectors = self.connectors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = connectors.iter().find(|(k, _)| *k == key) {
            return c.clone();
        }
        let mut b = crate::service::tls::get()
            .http(reqwest::Client::builder())
            // The SDK reads redirects (a bucket in another region) itself.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(t) = key.0 {
            b = b.connect_timeout(t);
        }
        if let Some(t) = key.1 {
            b = b.read_timeout(t);
        }
        let connector = SharedHttpConnector::new(S3Connector {
            client: b.build().map_err(|e| e.to_string()),
        });
        connectors.push((key, connector.clone()));
        connector
    }
}

#[derive(Debug)]
struct S3Connector {
    /// The client, or why none could be built (each call then fails with it).
    client: Result<reqwest::Client, String>,
}

impl HttpConnector for S3Connector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let client = self.client.clone();
        HttpConnectorFuture::new(async move {
            let client = client.map_err(|e| ConnectorError::user(e.into()))?;
            let request = request
                .try_into_http1x()
                .map_err(|e| ConnectorError::user(e.into()))?
                .map(reqwest::Body::wrap);
            let request =
                reqwest::Request::try_from(request).map_err(|e| ConnectorError::user(e.into()))?;
            let response = client.execute(request).await.map_err(|e| {
                if e.is_timeout() {
                    ConnectorError::timeout(e.into())
                } else if e.is_builder() {
                    ConnectorError::user(e.into())
                } else {
                    // Refused, reset, cut: transient, as the SDK's own client classifies them.
                    ConnectorError::io(e.into())
                }
            })?;
            let response = http::Response::from(response).map(SdkBody::from_body_1_x);
            HttpResponse::try_from(response).map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

/// The backend the settings name.
pub async fn from_settings(s: &StorageSettings) -> Result<Box<dyn Storage>, StorageError> {
    use crate::config::StorageBackend;
    match s.backend {
        StorageBackend::S3 => Ok(Box::new(S3Storage::new(s).await?)),
        StorageBackend::Local => Ok(Box::new(LocalStorage::new(&s.local_dir)?)),
    }
}
