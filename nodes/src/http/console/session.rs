//! Console sessions: who signed in, until when, and the token every change must carry.
//!
//! A session id is 256 random bits, sent as an HttpOnly, SameSite=Strict cookie (Secure under
//! TLS); only its SHA-256 is kept here, so a memory dump does not hand out live sessions. Each
//! session has its own CSRF token (also random), which every form and change request must echo.
//! Sessions end after an idle time and a maximum age, at sign-out, and with the process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::stages::tenancy::Principal;

/// One signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    pub who: Principal,
    /// What forms and change requests must send back (`csrf` field or `X-CSRF-Token`).
    pub csrf: String,
    created: Instant,
    seen: Instant,
}

/// The sessions of this node.
pub struct Sessions {
    by_hash: Mutex<HashMap<[u8; 32], Session>>,
    idle: Duration,
    max_age: Duration,
    max_sessions: usize,
}

/// Why a session cookie was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("not signed in")]
    Missing,
    #[error("the session has expired; sign in again")]
    Expired,
}

impl Sessions {
    pub fn new(idle: Duration, max_age: Duration, max_sessions: usize) -> Self {
        Self { by_hash: Mutex::new(HashMap::new()), idle, max_age, max_sessions }
    }

    /// A new session for `who`: the cookie value to send, and the session.
    pub fn create(&self, who: Principal) -> (String, Session) {
        self.create_at(who, Instant::now())
    }

    fn create_at(&self, who: Principal, now: Instant) -> (String, Session) {
        let id = random_hex();
        let s = Session { who, csrf: random_hex(), created: now, seen: now };
        let mut g = self.by_hash.lock().unwrap_or_else(|p| p.into_inner());
        g.retain(|_, s| !self.expired(s, now));
        if g.len() >= self.max_sessions {
            // Full: the least recently used session goes.
            if let Some(k) = g.iter().min_by_key(|(_, s)| s.seen).map(|(k, _)| *k) {
                g.remove(&k);
            }
        }
        g.insert(hash(&id), s.clone());
        metrics::gauge!("voxgate_console_sessions").set(g.len() as f64);
        (id, s)
    }

    /// The session of a cookie value, its idle time reset.
    pub fn get(&self, id: Option<&str>) -> Result<Session, SessionError> {
        self.get_at(id, Instant::now())
    }

    fn get_at(&self, id: Option<&str>, now: Instant) -> Result<Session, SessionError> {
        let id = id.filter(|i| i.len() == 64).ok_or(SessionError::Missing)?;
        let key = hash(id);
        let mut g = self.by_hash.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = g.get_mut(&key) else { return Err(SessionError::Missing) };
        if self.expired(s, now) {
            g.remove(&key);
            return Err(SessionError::Expired);
        }
        s.seen = now;
        Ok(s.clone())
    }

    pub fn end(&self, id: &str) {
        let mut g = self.by_hash.lock().unwrap_or_else(|p| p.into_inner());
        g.remove(&hash(id));
        metrics::gauge!("voxgate_console_sessions").set(g.len() as f64);
    }

    fn expired(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.seen) > self.idle || now.duration_since(s.created) > self.max_age
    }
}

fn hash(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

fn random_hex() -> String {
    crate::stages::tenancy::random_bytes::<32>().iter().map(|x| format!("{x:02x}")).collect()
}

/// Compares a presented CSRF token with the session's, in constant time.
pub fn csrf_ok(session: &Session, presented: Option<&str>) -> bool {
    presented.is_some_and(|p| voxgate_actors::tenancy::secret::constant_time_eq(session.csrf.as_bytes(), p.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_cookie_only() {
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(600), 10);
        let (id, made) = s.create(Principal::Admin);
        assert_eq!(s.get(Some(&id)).map(|x| x.csrf), Ok(made.csrf.clone()));
        let mut wrong = id.clone();
        wrong.replace_range(0..1, if id.starts_with('0') { "1" } else { "0" });
        assert_eq!(s.get(Some(&wrong)).map(|_| ()), Err(SessionError::Missing));
        assert_eq!(s.get(None).map(|_| ()), Err(SessionError::Missing));
        s.end(&id);
        assert_eq!(s.get(Some(&id)).map(|_| ()), Err(SessionError::Missing));
    }

    #[test]
    fn idle_sessions_expire() {
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(600), 10);
        let t0 = Instant::now();
        let (id, _) = s.create_at(Principal::Admin, t0);
        assert!(s.get_at(Some(&id), t0 + Duration::from_secs(59)).is_ok());
        // Seen at 59 s: idle until 119 s, but no older than 600 s in all.
        assert!(s.get_at(Some(&id), t0 + Duration::from_secs(118)).is_ok());
        assert_eq!(s.get_at(Some(&id), t0 + Duration::from_secs(179)).map(|_| ()), Err(SessionError::Expired));
        let (old, _) = s.create_at(Principal::Admin, t0);
        for i in 1..=12 {
            let _ = s.get_at(Some(&old), t0 + Duration::from_secs(50 * i));
        }
        assert_eq!(s.get_at(Some(&old), t0 + Duration::from_secs(601)).map(|_| ()), Err(SessionError::Expired));
    }

    #[test]
    fn csrf_must_match() {
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(600), 10);
        let (_, made) = s.create(Principal::Admin);
        assert!(csrf_ok(&made, Some(&made.csrf)));
        assert!(!csrf_ok(&made, Some("nope")));
        assert!(!csrf_ok(&made, None));
    }

    #[test]
    fn the_least_recently_used_session_makes_room() {
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(600), 2);
        let t0 = Instant::now();
        let (a, _) = s.create_at(Principal::Admin, t0);
        let (b, _) = s.create_at(Principal::Admin, t0 + Duration::from_secs(1));
        assert!(s.get_at(Some(&a), t0 + Duration::from_secs(2)).is_ok());
        let (c, _) = s.create_at(Principal::Admin, t0 + Duration::from_secs(3));
        assert!(s.get(Some(&a)).is_ok());
        assert!(s.get(Some(&b)).is_err());
        assert!(s.get(Some(&c)).is_ok());
    }
}
