//! API keys: a bearer key names a tenant. The gateway keeps only the SHA-256 digests of the
//! keys, read from files (`gateway.api_key_files` in a single-tenant fleet,
//! `tenants.<name>.api_key_files` in a multi-tenant one: one hex digest a line, `#` comments),
//! and reads them again when a file changes, so keys rotate without a restart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::config::{Settings, TenancyMode};
use crate::service::tenancy::Scope;

/// A new API key (`r2f_` and 43 characters of URL-safe base64: 256 random bits).
pub fn new_key() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "r2f_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The digest a key file holds for `key` (lowercase hex SHA-256).
pub fn digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The keys' digests and whose they are.
#[derive(Debug, Default)]
struct Table {
    by_digest: HashMap<[u8; 32], Scope>,
    /// The files read and when they were last changed.
    stamps: Vec<(PathBuf, Option<SystemTime>)>,
}

/// The key files of a fleet and the table read from them.
pub struct Keys {
    files: Vec<(PathBuf, Scope)>,
    table: RwLock<Arc<Table>>,
}

impl Keys {
    /// Reads every key file the settings name; an unreadable file or a line that is not a
    /// digest is an error (with the file and line), and so is a fleet without any key.
    pub fn load(settings: &Settings) -> anyhow::Result<Self> {
        let mut files = Vec::new();
        match settings.tenancy.mode {
            TenancyMode::Single => {
                for f in &settings.gateway.api_key_files {
                    files.push((PathBuf::from(f), Scope::single()));
                }
            }
            TenancyMode::Multi => {
                if !settings.gateway.api_key_files.is_empty() {
                    anyhow::bail!("gateway.api_key_files is for a single-tenant fleet: in a multi-tenant one each key belongs to a tenant (tenants.<name>.api_key_files)");
                }
                for (name, t) in &settings.tenants {
                    for f in &t.api_key_files {
                        files.push((PathBuf::from(f), Scope::tenant(name)));
                    }
                }
            }
        }
        let keys = Self {
            table: RwLock::new(Arc::new(read_table(&files)?)),
            files,
        };
        if keys.current().by_digest.is_empty() {
            anyhow::bail!(
                "the gateway has no API key: make one with `r2f key` and list the file of its digest in {}",
                match settings.tenancy.mode {
                    TenancyMode::Single => "gateway.api_key_files",
                    TenancyMode::Multi => "tenants.<name>.api_key_files",
                }
            );
        }
        Ok(keys)
    }

    fn current(&self) -> Arc<Table> {
        self.table
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The tenant of a bearer key, if it is one of the keys.
    pub fn scope_of(&self, key: &str) -> Option<Scope> {
        let d: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        self.current().by_digest.get(&d).cloned()
    }

    /// Reads the files again if one changed since it was read; a file that became unreadable
    /// or invalid leaves the keys as they were (and says why). True when the keys changed.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        let changed = self
            .current()
            .stamps
            .iter()
            .any(|(path, stamp)| modified(path) != *stamp);
        if !changed {
            return Ok(false);
        }
        let table = read_table(&self.files)?;
        if table.by_digest.is_empty() {
            anyhow::bail!("the key files hold no key now: keeping the keys read before");
        }
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        Ok(true)
    }
}

fn modified(path: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_table(files: &[(PathBuf, Scope)]) -> anyhow::Result<Table> {
    let mut table = Table::default();
    for (path, scope) in files {
        let stamp = modified(path);
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("API key file {}: {e}", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let hex_digest = line.strip_prefix("sha256:").unwrap_or(line);
            let bytes = hex::decode(hex_digest.to_ascii_lowercase())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "API key file {} line {}: not a SHA-256 digest in hex (64 digits; `r2f key` makes a key and its digest)",
                        path.display(),
                        i + 1
                    )
                })?;
            if let Some(other) = table.by_digest.insert(bytes, scope.clone()) {
                if other != *scope {
                    anyhow::bail!(
                        "API key file {} line {}: the same key is also another tenant's",
                        path.display(),
                        i + 1
                    );
                }
            }
        }
        table.stamps.push((path.clone(), stamp));
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &std::path::Path, toml: &str) -> Settings {
        let path = dir.join("c.toml");
        std::fs::write(&path, toml).unwrap();
        Settings::load(Some(&path)).unwrap()
    }

    #[test]
    fn keys_map_to_their_tenants_and_rotate_without_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (new_key(), new_key());
        assert!(a.starts_with("r2f_") && a.len() == 47 && a != b);
        let fa = dir.path().join("a.keys");
        let fb = dir.path().join("b.keys");
        std::fs::write(&fa, format!("# acme\n{}\n", digest(&a))).unwrap();
        std::fs::write(&fb, format!("sha256:{}  # beta\n", digest(&b))).unwrap();
        let s = settings(
            dir.path(),
            &format!(
                "[tenancy]\nmode = \"multi\"\n[tenants.acme]\napi_key_files = [{:?}]\n[tenants.beta]\napi_key_files = [{:?}]\n",
                fa, fb
            ),
        );
        let keys = Keys::load(&s).unwrap();
        assert_eq!(keys.scope_of(&a), Some(Scope::tenant("acme")));
        assert_eq!(keys.scope_of(&b), Some(Scope::tenant("beta")));
        assert_eq!(keys.scope_of("r2f_nope"), None);
        assert!(!keys.reload_if_changed().unwrap());
        // Rotation: a new key replaces the old one in acme's file.
        let c = new_key();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&fa, format!("{}\n", digest(&c))).unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&fa)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(keys.reload_if_changed().unwrap());
        assert_eq!(keys.scope_of(&a), None);
        assert_eq!(keys.scope_of(&c), Some(Scope::tenant("acme")));
        // A broken file keeps the keys read before.
        std::fs::write(&fa, "not a digest\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&fa)
            .unwrap()
            .set_modified(later + std::time::Duration::from_secs(5))
            .unwrap();
        let e = keys.reload_if_changed().unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        assert_eq!(keys.scope_of(&c), Some(Scope::tenant("acme")));
    }

    #[test]
    fn a_gateway_without_keys_or_with_a_bad_file_does_not_start() {
        let dir = tempfile::tempdir().unwrap();
        let e = Keys::load(&settings(dir.path(), "")).err().unwrap();
        assert!(e.to_string().contains("no API key"), "{e}");
        let f = dir.path().join("k");
        std::fs::write(&f, "abc\n").unwrap();
        let s = settings(
            dir.path(),
            &format!("[gateway]\napi_key_files = [{:?}]\n", f),
        );
        let e = Keys::load(&s).err().unwrap().to_string();
        assert!(e.contains("line 1") && e.contains("SHA-256"), "{e}");
        let s = settings(
            dir.path(),
            &format!(
                "[tenancy]\nmode = \"multi\"\n[tenants.a]\n[gateway]\napi_key_files = [{:?}]\n",
                f
            ),
        );
        assert!(Keys::load(&s).is_err());
    }
}
