//! voxgate logs in to a NATS server that demands it, and never shows the credentials. Each test
//! runs the real binary against a `nats-server -js` of its own, started from a config file with
//! an `authorization` block (and TLS), on a free loopback port with a temp store, killed on drop:
//! - a cluster node logs in with a user and password over TLS to a server that verifies client
//!   certificates (a CA, server and client certificates made here with `openssl`), takes a call
//!   on the JetStream log, and its health and log never show the password; with the wrong
//!   password it does not start, and its log says why without saying the password;
//! - credentials given in the URL (`nats://alice:…@host`) log in too, and health shows the URL
//!   without them;
//! - the analytics publisher logs in with a token: a plain client logged in alike sees the events,
//!   numbers redacted per tenant (dropped for one, hashed by default), no sealed auth token;
//! - the analytics publisher logs in with an NKey seed (the key pair made here with `nkeys`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;
use voxgate_protocol::{AccountSid, CallSid, SystemClock};
use voxgate_scenarios::fixture::{config, each_event_once, node_specs, sim, ACCOUNT, NUMBER, PUBLIC, SECRETS_KEY};
use voxgate_scenarios::nats::Nats;
use voxgate_scenarios::node::Node;
use voxgate_scenarios::twilio::Simulator;
use voxgate_storage::{topics, ClusterOptions, Log, NatsAuth};

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-5d1e8b2a9c7f4036";
const ADMIN: &str = "admin-6e2a9d4c1b8f0e3a7c5d";
const NATS_TOKEN: &str = "nats-tok3n-8c1f5a0e2d7b9463";

// ---- A nats-server that asks for credentials.

/// A CA, a certificate for the server at 127.0.0.1 and one for a client, made with `openssl`
/// (EC P-256, valid two days).
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("openssl.cnf"),
            "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = ca\n[dn]\nCN = voxgate test CA\n\
             [ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n\
             subjectKeyIdentifier = hash\n",
        )
        .unwrap();
        let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -config openssl.cnf";
        openssl(d, &format!("req -x509 {ec} -keyout ca.key -out ca.pem -days 2"));
        for (serial, name, usage, san) in
            [(2, "server", "serverAuth", "subjectAltName = IP:127.0.0.1\n"), (3, "client", "clientAuth", "")]
        {
            std::fs::write(
                d.join(format!("{name}.ext")),
                format!(
                    "basicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\nextendedKeyUsage = {usage}\n\
                     authorityKeyIdentifier = keyid\n{san}"
                ),
            )
            .unwrap();
            openssl(d, &format!("req -new {ec} -subj /CN={name} -keyout {name}.key -out {name}.csr"));
            openssl(
                d,
                &format!(
                    "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -set_serial {serial} -days 2 -out {name}.pem \
                     -extfile {name}.ext"
                ),
            );
        }
        Pki { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The server's `tls` block: its certificate, and client certificates required and verified.
    fn server_tls(&self) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n  timeout: 5\n}}\n",
            self.path("server.pem"),
            self.path("server.key"),
            self.path("ca.pem")
        )
    }

    /// voxgate's `tls_*` keys: trust the CA, present the client certificate.
    fn auth_keys(&self) -> String {
        format!(
            "tls_ca_file = {:?}\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
            self.path("ca.pem"),
            self.path("client.pem"),
            self.path("client.key")
        )
    }

    /// The same as a [`NatsAuth`] for the test's own clients, with `user` and `password`.
    fn nats_auth(&self, user: &str, password: &str) -> NatsAuth {
        NatsAuth {
            user: Some(user.into()),
            password: Some(password.into()),
            tls_ca_file: Some(self.path("ca.pem")),
            tls_cert_file: Some(self.path("client.pem")),
            tls_key_file: Some(self.path("client.key")),
            ..Default::default()
        }
    }
}

/// The server turned a client away for want of `what` (and not for anything else, TLS say).
fn assert_refused(r: Result<async_nats::Client, async_nats::ConnectError>, what: &str) {
    match r {
        Ok(_) => panic!("nats-server let a client in without {what}"),
        Err(e) => assert!(e.to_string().contains("authorization violation"), "refused, but not for {what}: {e}"),
    }
}

/// `openssl` with `args` (split at spaces) in `dir`.
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args.split(' '))
        .output()
        .expect("openssl (bash .ci/run installs it)");
    assert!(out.status.success(), "openssl {args}: {}", String::from_utf8_lossy(&out.stderr));
}

// ---- voxgate's side.

/// A cluster node (every role, STT off) on `nats_url`, with `auth` as its `[cluster.auth]` and
/// `tables` after it.
fn cluster_config(nats_url: &str, node: &str, auth: &str, tables: &str) -> String {
    config(&format!(
        "secrets_key = \"{SECRETS_KEY}\"\n[stt]\nenabled = false\n[cluster]\nnats_url = \"{nats_url}\"\nnode = \"{node}\"\n[cluster.auth]\n{auth}\n{tables}"
    ))
}

/// Health, once `ready` holds for it (bounded).
async fn health_when(node: &Node, within: Duration, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (_, h) = node.get_json("/api/voice/health").await.unwrap();
        if ready(&h) {
            return h;
        }
        assert!(Instant::now() < deadline, "health not as expected within {within:?}: {h}\nnode log:\n{}", node.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `secret` shows nowhere in the node's log or in `health`.
fn assert_hidden(secret: &str, node: &Node, health: &Value) {
    let logs = node.logs();
    assert!(!logs.is_empty(), "the node logged nothing");
    assert!(!logs.contains(secret), "the node's log shows {secret:?}:\n{logs}");
    let h = health.to_string();
    assert!(!h.contains(secret), "health shows {secret:?}: {h}");
}

/// Rings the fixture tenant's number and expects `<Connect><Stream>`.
async fn answered(s: &Simulator, call: CallSid, from: &str, to: &str) {
    let a = s.inbound_call(call, from, to).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.body.contains("<Stream"), "call {call} not accepted: {}", a.body);
}

// ---- A plain NATS client's view of the analytics subjects.

/// A JetStream stream capturing `voxgate.events.>`, made by a client logged in with `opts`.
async fn events_stream(url: &str, opts: async_nats::ConnectOptions) -> async_nats::jetstream::stream::Stream {
    use async_nats::jetstream;
    let client = opts.connect(url).await.expect("the test's own client logs in");
    let cfg = jetstream::stream::Config {
        name: "VOXGATE_EVENTS".into(),
        subjects: vec!["voxgate.events.>".into()],
        ..Default::default()
    };
    jetstream::new(client).create_stream(cfg).await.unwrap()
}

/// Messages of `stream` from its start until `done` says the collection is complete (or `within`
/// passes), as (subject, JSON, raw text).
async fn collect(
    stream: &async_nats::jetstream::stream::Stream,
    within: Duration,
    done: impl Fn(&[(String, Value, String)]) -> bool,
) -> Vec<(String, Value, String)> {
    use async_nats::jetstream::consumer;
    let consumer = stream
        .create_consumer(consumer::pull::Config { deliver_policy: consumer::DeliverPolicy::All, ..Default::default() })
        .await
        .unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while !done(&got) {
        match tokio::time::timeout_at(deadline, msgs.next()).await {
            Ok(Some(Ok(m))) => {
                let text = String::from_utf8(m.payload.to_vec()).expect("UTF-8");
                got.push((m.subject.to_string(), serde_json::from_str(&text).expect("JSON"), text));
                let _ = m.ack().await;
            }
            Ok(Some(Err(_))) => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => break,
        }
    }
    got
}

/// The event of `kind` about `tenant` (and `call`, when given), if collected.
fn find<'a>(got: &'a [(String, Value, String)], tenant: &str, kind: &str, call: Option<CallSid>) -> Option<&'a Value> {
    got.iter()
        .map(|(_, v, _)| v)
        .find(|v| v["kind"] == kind && v["tenant"] == tenant && call.is_none_or(|c| v["call_sid"] == c.to_string()))
}

/// An `h:` and 24 hex digits keyed hash.
fn is_hash(v: &Value) -> bool {
    v.as_str()
        .and_then(|s| s.strip_prefix("h:"))
        .is_some_and(|h| h.len() == 24 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

struct Reply {
    status: u16,
    json: Value,
}

/// A Twilio-shaped REST request with HTTP Basic auth.
async fn rest(node: &Node, path: &str, user: &str, pass: &str, params: &[(&str, &str)]) -> Reply {
    let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish();
    let resp = reqwest::Client::new()
        .request(Method::POST, format!("{}{path}", node.url()))
        .basic_auth(user, Some(pass))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let json = serde_json::from_str(&resp.text().await.unwrap()).unwrap_or(Value::Null);
    Reply { status, json }
}

// ---- The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_logs_in_over_verified_tls_and_never_shows_the_password() {
    let pki = Pki::new();
    let nats = Nats::with_settings(&format!(
        "{}authorization {{\n  user: {USER}\n  password: \"{PASSWORD}\"\n}}\n",
        pki.server_tls()
    ));
    let url = nats.url_with("tls");
    // The server really asks: the client certificate alone, without the password, is refused.
    let anonymous = NatsAuth { user: None, password: None, ..pki.nats_auth(USER, PASSWORD) };
    let refused = anonymous.apply(async_nats::ConnectOptions::new()).await.unwrap().connect(url.as_str()).await;
    assert_refused(refused, "the password");

    let tls = pki.auth_keys();
    let login = format!("user = \"{USER}\"\npassword = \"{PASSWORD}\"\n{tls}");
    let mut node = Node::start(&cluster_config(&url, "secure", &login, ""))
        .unwrap_or_else(|e| panic!("{e:#}\nnats-server log:\n{}", nats.logs()));
    let health = health_when(&node, Duration::from_secs(20), |h| h["log"]["jetstream"]["connected"] == true).await;
    assert_eq!(health["log"]["backend"], "jetstream", "{health}");
    assert_eq!(health["log"]["jetstream"]["url"], url.as_str(), "{health}");

    // A call, answered and recorded on the server voxgate logged in to (not in a spool).
    let s = sim(&node);
    let call = CallSid::from_u128(0x5ec1);
    answered(&s, call, "+14155550041", NUMBER).await;
    node.advance_clock(Duration::from_secs(30)).await.unwrap();
    assert_eq!(s.status_callback(call, "completed", 1, Some(30)).await.unwrap(), 204);
    let health = health_when(&node, Duration::from_secs(20), |h| {
        h["log"]["jetstream"]["connected"] == true && h["log"]["jetstream"]["spooled"] == 0
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ClusterOptions::new(&url);
    opts.auth = pki.nats_auth(USER, PASSWORD);
    let log = Log::open_cluster(dir.path(), &node_specs(), Arc::new(SystemClock), 64 << 20, &opts).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut kinds = Vec::new();
        each_event_once(&log, &[topics::CALLS], |env| {
            if env.call == Some(call) {
                kinds.push(env.payload.kind());
            }
        });
        if kinds.contains(&"call_received") && kinds.contains(&"call_status_changed") {
            break;
        }
        assert!(Instant::now() < deadline, "the call's events are not on the cluster's log: {kinds:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(log);
    // The log names the server it joined (and so would show a URL's login).
    assert!(node.logs().contains(&url), "the log never names the NATS server {url}:\n{}", node.logs());
    assert_hidden(PASSWORD, &node, &health);
    node.stop().unwrap();
    assert!(!node.logs().contains(PASSWORD), "the password shows in the log of the node's shutdown");

    // The wrong password: the node does not start, and says why without saying the password.
    let wrong = "s3cret-wrong-0a9b8c7d6e5f";
    let login = format!("user = \"{USER}\"\npassword = \"{wrong}\"\n{tls}");
    let err = Node::start(&cluster_config(&url, "wrong", &login, ""))
        .err()
        .expect("a node with the wrong NATS password became ready");
    // The error carries the node's whole log.
    let text = format!("{err:#}");
    assert!(text.to_lowercase().contains("authorization violation"), "{text}");
    assert!(text.contains(&url), "the failure does not name the server: {text}");
    assert!(!text.contains(wrong) && !text.contains(PASSWORD), "the failure shows the password: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_url_log_in_and_health_shows_the_url_without_them() {
    let pki = Pki::new();
    let nats = Nats::with_settings(&format!(
        "{}authorization {{\n  user: {USER}\n  password: \"{PASSWORD}\"\n}}\n",
        pki.server_tls()
    ));
    let tls = pki.auth_keys();
    let embedded = format!("nats://{USER}:{PASSWORD}@127.0.0.1:{}", nats.port());
    let shown = nats.url();
    // The log on the cluster, analytics to the same server: both URLs carry the login.
    let analytics = format!("[analytics]\nnats_url = \"{embedded}\"\n[analytics.auth]\n{tls}");
    let node = Node::start(&cluster_config(&embedded, "embedded", &tls, &analytics))
        .unwrap_or_else(|e| panic!("the login in the URL was not used: {e:#}\nnats-server log:\n{}", nats.logs()));
    let health = health_when(&node, Duration::from_secs(20), |h| {
        h["log"]["jetstream"]["connected"] == true && h["nats"]["connected"] == true
    })
    .await;
    assert_eq!(health["log"]["jetstream"]["url"], shown.as_str(), "{health}");
    assert_eq!(health["nats"]["url"], shown.as_str(), "{health}");
    assert!(!health.to_string().contains(&format!("{USER}:")), "health shows the URL's user: {health}");
    assert!(node.logs().contains(&shown), "the log never names the NATS server {shown}:\n{}", node.logs());
    assert_hidden(PASSWORD, &node, &health);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_logs_in_with_a_token_and_redacts_numbers_per_tenant() {
    let nats = Nats::with_settings(&format!("authorization {{\n  token: \"{NATS_TOKEN}\"\n}}\n"));
    let url = nats.url();
    assert_refused(async_nats::connect(url.as_str()).await, "the token");
    let events = events_stream(&url, async_nats::ConnectOptions::with_token(NATS_TOKEN.into())).await;
    // Numbers hashed by default; the fixture tenant (which makes the first call) has them dropped.
    let node = Node::start(&config(&format!(
        "admin_token = \"{ADMIN}\"\n[stt]\nenabled = false\n[analytics]\nnats_url = \"{url}\"\n[analytics.auth]\n\
         token = \"{NATS_TOKEN}\"\n[analytics.redact]\nnumbers = \"hash\"\n[analytics.redact.tenants.{ACCOUNT}]\n\
         numbers = \"drop\"\n"
    )))
    .unwrap();

    let a_call = CallSid::from_u128(0x70c1);
    answered(&sim(&node), a_call, "+14155550051", NUMBER).await;
    // A tenant made over REST, its number, and a call to it.
    let r = rest(&node, "/2010-04-01/Accounts.json", "admin", ADMIN, &[("FriendlyName", "Tenant B")]).await;
    assert_eq!(r.status, 201, "{}", r.json);
    let b = r.json["sid"].as_str().unwrap().to_owned();
    let b_token = r.json["auth_token"].as_str().unwrap().to_owned();
    let b_number = "+14155550777";
    let path = format!("/2010-04-01/Accounts/{b}/IncomingPhoneNumbers.json");
    let r = rest(&node, &path, &b, &b_token, &[("PhoneNumber", b_number)]).await;
    assert_eq!(r.status, 201, "{}", r.json);
    let b_call = CallSid::from_u128(0x70c2);
    let sim_b = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(&b).unwrap(), &b_token);
    answered(&sim_b, b_call, "+14155550052", b_number).await;

    let got = collect(&events, Duration::from_secs(30), |g| {
        find(g, ACCOUNT, "call_received", Some(a_call)).is_some()
            && find(g, &b, "call_received", Some(b_call)).is_some()
            && find(g, &b, "tenant_created", None).is_some()
            && find(g, &b, "number_assigned", None).is_some()
    })
    .await;
    let event = |tenant: &str, kind: &str, call: Option<CallSid>| {
        find(&got, tenant, kind, call)
            .unwrap_or_else(|| panic!("no {kind} of {tenant} on NATS; got {got:?}\nnode log:\n{}", node.logs()))
    };
    // The fixture tenant: numbers dropped.
    let a = event(ACCOUNT, "call_received", Some(a_call));
    assert_eq!((a["from"].as_str(), a["to"].as_str()), (Some("[redacted]"), Some("[redacted]")), "{a}");
    // Tenant B: numbers hashed, equal numbers alike (its number joins its call).
    let created = event(&b, "tenant_created", None);
    assert_eq!(created["friendly_name"], "Tenant B", "{created}");
    assert!(created.get("sealed_auth_token").is_none(), "a sealed auth token left voxgate: {created}");
    let assigned = event(&b, "number_assigned", None);
    let received = event(&b, "call_received", Some(b_call));
    assert!(is_hash(&received["from"]) && is_hash(&received["to"]), "{received}");
    assert_ne!(received["from"], received["to"], "{received}");
    assert_eq!(assigned["number"], received["to"], "{assigned} / {received}");
    // Nothing that left voxgate carries a number, a token or a sealed token.
    for (subject, v, text) in &got {
        assert!(subject.starts_with("voxgate.events.AC"), "{subject}");
        assert!(!text.contains("+1415"), "a phone number left voxgate on {subject}: {text}");
        assert!(!text.contains(&b_token) && !text.contains(NATS_TOKEN), "a token left voxgate on {subject}: {text}");
        assert!(v.get("sealed_auth_token").is_none(), "a sealed auth token left voxgate on {subject}: {text}");
    }

    let health = health_when(&node, Duration::from_secs(10), |h| h["nats"]["connected"] == true).await;
    assert_eq!(health["nats"]["url"], url.as_str(), "{health}");
    assert_hidden(NATS_TOKEN, &node, &health);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_logs_in_with_an_nkey_seed() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let nats =
        Nats::with_settings(&format!("authorization {{\n  users = [ {{ nkey: \"{}\" }} ]\n}}\n", user.public_key()));
    let url = nats.url();
    assert_refused(async_nats::connect(url.as_str()).await, "the NKey");
    let events = events_stream(&url, async_nats::ConnectOptions::with_nkey(seed.clone())).await;
    let node = Node::start(&config(&format!(
        "[stt]\nenabled = false\n[analytics]\nnats_url = \"{url}\"\n[analytics.auth]\nnkey_seed = \"{seed}\"\n"
    )))
    .unwrap();

    let call = CallSid::from_u128(0x7c1);
    answered(&sim(&node), call, "+14155550061", NUMBER).await;
    let got =
        collect(&events, Duration::from_secs(30), |g| find(g, ACCOUNT, "call_received", Some(call)).is_some()).await;
    let received = find(&got, ACCOUNT, "call_received", Some(call))
        .unwrap_or_else(|| panic!("call_received not on NATS; got {got:?}\nnode log:\n{}", node.logs()));
    // No redaction configured: the numbers as recorded.
    assert_eq!((received["from"].as_str(), received["to"].as_str()), (Some("+14155550061"), Some(NUMBER)));

    let health = health_when(&node, Duration::from_secs(10), |h| h["nats"]["connected"] == true).await;
    assert_eq!(health["nats"]["url"], url.as_str(), "{health}");
    assert_hidden(&seed, &node, &health);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_settings_that_cannot_be_used_stop_the_node_at_start_up() {
    // The file exists (the settings check passes) but holds no credentials: the node says so and
    // exits, rather than retrying settings that will never work.
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("broken.creds");
    std::fs::write(&creds, "not a credentials file\n").unwrap();
    let started = Node::start(&config(&format!(
        "[stt]\nenabled = false\n[analytics]\nnats_url = \"nats://127.0.0.1:4\"\n[analytics.auth]\ncreds_file = \"{}\"\n",
        creds.display()
    )));
    let err = match started {
        Ok(node) => panic!("the node started with unusable analytics settings; its log:\n{}", node.logs()),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("[analytics] NATS settings") && err.contains("broken.creds"), "{err}");
}
