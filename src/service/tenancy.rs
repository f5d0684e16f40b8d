//! Who a job belongs to. In a multi-tenant fleet (`tenancy.mode = "multi"`) a job's tenant is
//! its broker user: the AMQP `user_id` property, which RabbitMQ refuses to pass on unless it
//! equals the publishing connection's user (workers, which re-publish jobs on retries and
//! routing, need the `impersonator` tag to keep it). Everything about a job is then keyed by
//! ([`Scope`], id): its status record, cancel requests, lock, id claim, storage keys and event
//! routing keys, so that no message can read, change, cancel or replay another tenant's job.
//! In a single-tenant fleet there is one unnamed scope and the layout of earlier releases.

use std::collections::{BTreeMap, HashMap};

use crate::config::{Settings, TenancyMode, TenantSettings};
use crate::job::{Limits, Rejection};
use crate::service::redis_store::RedisStore;

/// The scope of a job's keys: a tenant's name, or none in a single-tenant fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Scope(Option<String>);

impl Scope {
    /// The one scope of a single-tenant fleet.
    pub fn single() -> Self {
        Scope(None)
    }

    pub fn tenant(name: &str) -> Self {
        Scope(Some(name.to_string()))
    }

    /// The tenant's name (none in a single-tenant fleet).
    pub fn name(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// Key parts: the tenant's name, then `parts` (`["status", id]` becomes
    /// `["status", tenant, id]`); unchanged in a single-tenant fleet.
    pub fn key<'a>(&'a self, kind: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
        let mut out = vec![kind];
        out.extend(self.0.as_deref());
        out.extend_from_slice(rest);
        out
    }

    /// The routing key of an event about job `id`: `job.<kind>` in a single-tenant fleet,
    /// `job.<kind>.<tenant>.<id>` in a multi-tenant one (a tenant's users may bind only
    /// `job.*.<tenant>.#`).
    pub fn routing_key(&self, kind: &str, id: &str) -> String {
        match &self.0 {
            None => format!("job.{kind}"),
            Some(t) => format!("job.{kind}.{t}.{id}"),
        }
    }

    /// The routing key of a notice about job `id` while it runs (`started`, `progress`): per
    /// job in every fleet, `job.<kind>.<id>` in a single-tenant one and
    /// `job.<kind>.<tenant>.<id>` in a multi-tenant one, so that a client binds its own job's
    /// and nobody has to filter everyone's.
    pub fn notice_key(&self, kind: &str, id: &str) -> String {
        match &self.0 {
            None => format!("job.{kind}.{id}"),
            Some(t) => format!("job.{kind}.{t}.{id}"),
        }
    }

    /// The prefix of the reply queues a tenant may name in `reply_to` (`r2f.reply.<tenant>.`);
    /// none in a single-tenant fleet (`amqp.reply_to_prefixes` apply).
    pub fn reply_prefix(&self) -> Option<String> {
        self.0.as_ref().map(|t| format!("r2f.reply.{t}."))
    }
}

/// A job by (scope, id): what every per-job key is made of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobKey {
    pub scope: Scope,
    pub id: String,
}

impl JobKey {
    pub fn new(scope: Scope, id: impl Into<String>) -> Self {
        Self {
            scope,
            id: id.into(),
        }
    }

    /// A single-tenant fleet's job.
    pub fn single(id: impl Into<String>) -> Self {
        Self::new(Scope::single(), id)
    }

    /// The Redis key `<prefix>:<kind>[:<tenant>]:<id>`.
    pub fn redis_key(&self, redis: &RedisStore, kind: &str) -> String {
        redis.key(&self.scope.key(kind, &[&self.id]))
    }
}

/// A fleet's tenants, as the settings describe them.
#[derive(Debug, Clone)]
pub struct Tenancy {
    mode: TenancyMode,
    tenants: BTreeMap<String, TenantSettings>,
    by_user: HashMap<String, String>,
}

/// Why a message has no tenant.
pub const NO_USER_ID: &str =
    "the message has no user_id: in a multi-tenant fleet jobs are published with the AMQP user_id property set to the publishing broker user";

impl Tenancy {
    pub fn from_settings(s: &Settings) -> Self {
        let mut by_user = HashMap::new();
        for (name, t) in &s.tenants {
            let users: Vec<String> = if t.users.is_empty() {
                vec![name.clone()]
            } else {
                t.users.clone()
            };
            for u in users {
                by_user.insert(u, name.clone());
            }
        }
        Self {
            mode: s.tenancy.mode,
            tenants: s.tenants.clone(),
            by_user,
        }
    }

    pub fn mode(&self) -> TenancyMode {
        self.mode
    }

    /// The scope of a message published by broker user `user_id` (its validated `user_id`
    /// property). A multi-tenant fleet refuses a message without one, or from a user that is no
    /// tenant's.
    pub fn scope_of(&self, user_id: Option<&str>) -> Result<Scope, Rejection> {
        if self.mode == TenancyMode::Single {
            return Ok(Scope::single());
        }
        let user = user_id.ok_or_else(|| Rejection(NO_USER_ID.into()))?;
        self.by_user
            .get(user)
            .map(|t| Scope::tenant(t))
            .ok_or_else(|| {
                let shown: String = user.chars().take(40).collect();
                Rejection(format!(
                    "broker user `{shown}` is no tenant's ([tenants.*] users)"
                ))
            })
    }

    /// The settings of the scope's tenant (none in a single-tenant fleet).
    pub fn settings(&self, scope: &Scope) -> Option<&TenantSettings> {
        scope.name().and_then(|t| self.tenants.get(t))
    }

    /// The limits a job of `scope` is held to: the fleet's, narrowed by the tenant's own.
    pub fn limits(&self, scope: &Scope, fleet: &Limits) -> Limits {
        let mut l = fleet.clone();
        if let Some(t) = self.settings(scope) {
            if let Some(s) = t.max_steps {
                l.max_steps = l.max_steps.min(s);
            }
            if let Some(p) = t.max_pixels {
                l.max_pixels = l.max_pixels.min(p);
            }
        }
        l
    }

    /// The models a job of `scope` may name: the fleet's, narrowed by the tenant's list.
    pub fn models(&self, scope: &Scope, fleet: &[String]) -> Vec<String> {
        match self.settings(scope) {
            Some(t) if !t.models.is_empty() => fleet
                .iter()
                .filter(|m| t.models.contains(m))
                .cloned()
                .collect(),
            _ => fleet.to_vec(),
        }
    }

    /// The tenants and their settings.
    pub fn tenants(&self) -> impl Iterator<Item = (&String, &TenantSettings)> {
        self.tenants.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(mode: &str) -> Settings {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            format!(
                "[tenancy]\nmode = \"{mode}\"\n[tenants.acme]\nusers = [\"acme-1\", \"acme-2\"]\nmax_steps = 10\nmodels = [\"sd3\"]\n[tenants.beta]\n"
            ),
        )
        .unwrap();
        Settings::load(Some(&path)).unwrap()
    }

    #[test]
    fn a_message_belongs_to_its_broker_users_tenant() {
        let s = settings("multi");
        let t = Tenancy::from_settings(&s);
        assert_eq!(t.scope_of(Some("acme-2")).unwrap(), Scope::tenant("acme"));
        assert_eq!(t.scope_of(Some("beta")).unwrap(), Scope::tenant("beta"));
        assert!(t.scope_of(None).unwrap_err().0.contains("no user_id"));
        assert!(t
            .scope_of(Some("acme"))
            .unwrap_err()
            .0
            .contains("no tenant's"));
        let acme = Scope::tenant("acme");
        assert_eq!(t.limits(&acme, &s.limits).max_steps, 10);
        assert_eq!(
            t.limits(&Scope::tenant("beta"), &s.limits).max_steps,
            s.limits.max_steps
        );
        let fleet = vec!["sd3".to_string(), "sdxl".to_string()];
        assert_eq!(t.models(&acme, &fleet), vec!["sd3".to_string()]);
        assert_eq!(acme.key("status", &["j1"]), vec!["status", "acme", "j1"]);
        assert_eq!(acme.routing_key("succeeded", "j1"), "job.succeeded.acme.j1");
        assert_eq!(acme.reply_prefix().as_deref(), Some("r2f.reply.acme."));
    }

    #[test]
    fn a_single_tenant_fleet_keeps_the_old_layout() {
        let t = Tenancy::from_settings(&settings("single"));
        let s = t.scope_of(None).unwrap();
        assert_eq!(s, Scope::single());
        assert_eq!(s.key("status", &["j1"]), vec!["status", "j1"]);
        assert_eq!(s.routing_key("succeeded", "j1"), "job.succeeded");
        assert_eq!(s.notice_key("progress", "j1"), "job.progress.j1");
        assert_eq!(
            Scope::tenant("acme").notice_key("progress", "j1"),
            "job.progress.acme.j1"
        );
        assert_eq!(s.reply_prefix(), None);
    }
}
