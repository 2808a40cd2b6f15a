//! How voxgate connects to NATS (the JetStream log and the analytics publisher): credentials —
//! user and password, a token, an NKey seed or a `.creds` file — and TLS with a custom CA and a
//! client certificate. NATS carries the control plane (tenants, budget stops, work claims), so a
//! production server asks for both.
//!
//! Secrets never leave: [`NatsAuth`]'s `Debug` hides them, and [`redact_url`] strips the user
//! information of a URL before it is shown in health or a log line.

use std::path::PathBuf;

use serde::Deserialize;

/// `[cluster.auth]` / `[analytics.auth]`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct NatsAuth {
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// An NKey user seed (`SU…`), or `nkey_seed_file` holding one.
    pub nkey_seed: Option<String>,
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT and NKey seed, as `nsc` writes it).
    pub creds_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for the server's certificate (else the system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for servers that verify clients.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Refuse a connection that is not TLS (implied by any `tls_*` file or a `tls://` URL).
    pub tls_required: bool,
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |o: &Option<String>| o.as_ref().map(|_| "[redacted]");
        f.debug_struct("NatsAuth")
            .field("user", &self.user)
            .field("password", &hidden(&self.password))
            .field("token", &hidden(&self.token))
            .field("nkey_seed", &hidden(&self.nkey_seed))
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

/// Why NATS connection settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NatsAuthError {
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {path}: {source}")]
    File { what: &'static str, path: String, source: std::io::Error },
}

impl NatsAuth {
    /// Checks that the settings make one coherent login (and that the files they name exist).
    pub fn validate(&self) -> Result<(), NatsAuthError> {
        let invalid = |s: &str| Err(NatsAuthError::Invalid(s.to_owned()));
        let methods = [
            self.user.is_some() || self.password.is_some(),
            self.token.is_some(),
            self.nkey_seed.is_some() || self.nkey_seed_file.is_some(),
            self.creds_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return invalid("give one of user/password, token, nkey_seed(_file) or creds_file");
        }
        if self.user.is_some() != self.password.is_some() {
            return invalid("user and password go together");
        }
        if self.nkey_seed.is_some() && self.nkey_seed_file.is_some() {
            return invalid("give nkey_seed or nkey_seed_file, not both");
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return invalid("tls_cert_file and tls_key_file go together");
        }
        for (what, p) in [
            ("nkey_seed_file", &self.nkey_seed_file),
            ("creds_file", &self.creds_file),
            ("tls_ca_file", &self.tls_ca_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
        ] {
            if let Some(p) = p {
                std::fs::metadata(p).map_err(|source| NatsAuthError::File {
                    what,
                    path: p.display().to_string(),
                    source,
                })?;
            }
        }
        if let Some(seed) = &self.nkey_seed {
            if !seed.starts_with('S') {
                return invalid("nkey_seed must be an NKey seed (it starts with S)");
            }
        }
        Ok(())
    }

    /// These settings, with the credentials a URL carries (`nats://user:pass@host`, or
    /// `nats://token@host`) when no other login is configured: async-nats ignores user
    /// information in URLs, so voxgate takes it out and logs in with it. Connect to
    /// [`redact_url`] of the URL afterwards.
    pub fn with_url_credentials(&self, url: &str) -> NatsAuth {
        let configured = self.user.is_some()
            || self.token.is_some()
            || self.nkey_seed.is_some()
            || self.nkey_seed_file.is_some()
            || self.creds_file.is_some();
        let mut out = self.clone();
        if configured {
            return out;
        }
        let first = url.split(',').next().unwrap_or_default().trim();
        let rest = first.split_once("://").map_or(first, |(_, r)| r);
        let Some((userinfo, _)) = rest.rsplit_once('@') else { return out };
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        match userinfo.split_once(':') {
            Some((u, p)) => {
                out.user = Some(decode(u));
                out.password = Some(decode(p));
            }
            None if !userinfo.is_empty() => out.token = Some(decode(userinfo)),
            None => {}
        }
        out
    }

    fn tls(&self) -> bool {
        self.tls_required || self.tls_ca_file.is_some() || self.tls_cert_file.is_some()
    }

    /// `opts` with these credentials and TLS settings.
    pub async fn apply(
        &self,
        mut opts: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, NatsAuthError> {
        if let (Some(u), Some(p)) = (&self.user, &self.password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &self.token {
            opts = opts.token(t.clone());
        }
        let seed = match (&self.nkey_seed, &self.nkey_seed_file) {
            (Some(s), _) => Some(s.trim().to_owned()),
            (None, Some(p)) => Some(
                std::fs::read_to_string(p)
                    .map_err(|source| NatsAuthError::File {
                        what: "nkey_seed_file",
                        path: p.display().to_string(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        if let Some(seed) = seed {
            opts = opts.nkey(seed);
        }
        if let Some(p) = &self.creds_file {
            opts = opts.credentials_file(p).await.map_err(|source| NatsAuthError::File {
                what: "creds_file",
                path: p.display().to_string(),
                source,
            })?;
        }
        if let Some(ca) = &self.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(c), Some(k)) = (&self.tls_cert_file, &self.tls_key_file) {
            opts = opts.add_client_certificate(c.clone(), k.clone());
        }
        if self.tls() {
            opts = opts.require_tls(true);
        }
        Ok(opts)
    }
}

/// `url` without user information (`nats://user:secret@host:4222` → `nats://host:4222`), for
/// health and logs. A comma-separated list of URLs is redacted entry by entry.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|u| {
            let u = u.trim();
            let (scheme, rest) = match u.split_once("://") {
                Some((s, r)) => (Some(s), r),
                None => (None, u),
            };
            // User information ends at the last '@' (a password may hold a raw '/').
            let after_user = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            let authority_end = after_user.find('/').unwrap_or(after_user.len());
            let (host, path) = after_user.split_at(authority_end);
            match scheme {
                Some(s) => format!("{s}://{host}{path}"),
                None => format!("{host}{path}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(redact_url("nats://alice:s3cret@127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("tls://tok3n@nats.example.com:4222"), "tls://nats.example.com:4222");
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("a:b@host:1, nats://c:d@h2:2"), "host:1,nats://h2:2");
        assert_eq!(redact_url("nats://u:p%40x@h/path"), "nats://h/path");
        assert_eq!(redact_url("nats://alice:p/w@host:4222"), "nats://host:4222");
    }

    #[test]
    fn url_credentials_become_the_login_unless_one_is_configured() {
        let a = NatsAuth::default().with_url_credentials("nats://alice:s3%40cret@127.0.0.1:4222");
        assert_eq!((a.user.as_deref(), a.password.as_deref()), (Some("alice"), Some("s3@cret")));
        let t = NatsAuth::default().with_url_credentials("tls://tok3n@h:4222");
        assert_eq!(t.token.as_deref(), Some("tok3n"));
        let slash = NatsAuth::default().with_url_credentials("nats://alice:p/w@h:4222");
        assert_eq!(slash.password.as_deref(), Some("p/w"));
        let configured = NatsAuth { token: Some("x".into()), ..Default::default() };
        assert_eq!(configured.with_url_credentials("nats://a:b@h"), configured);
        assert_eq!(NatsAuth::default().with_url_credentials("nats://h:4222"), NatsAuth::default());
    }

    #[test]
    fn debug_hides_secrets_and_logins_are_coherent() {
        let a = NatsAuth { user: Some("alice".into()), password: Some("s3cret".into()), ..Default::default() };
        let d = format!("{a:?}");
        assert!(d.contains("alice") && !d.contains("s3cret"), "{d}");
        a.validate().unwrap();
        let both = NatsAuth { token: Some("t".into()), ..a.clone() };
        assert!(both.validate().is_err());
        let half = NatsAuth { user: Some("alice".into()), ..Default::default() };
        assert!(half.validate().is_err());
        let missing = NatsAuth { tls_ca_file: Some("/nonexistent/ca.pem".into()), ..Default::default() };
        assert!(missing.validate().unwrap_err().to_string().contains("/nonexistent/ca.pem"));
        let seed = NatsAuth { nkey_seed: Some("UABC".into()), ..Default::default() };
        assert!(seed.validate().is_err());
    }
}
