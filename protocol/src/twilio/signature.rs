//! `X-Twilio-Signature`: computing and checking it exactly as twilio-python 9.13.0's
//! `RequestValidator` does (wire doc §2.2), with a real constant-time comparison.
//!
//! The signed string is the full URL Twilio requested followed by `name` + `value` of every form
//! parameter, sorted by name and then value (byte order), identical values of one name counted
//! once. The MAC is HMAC-SHA1 (or HMAC-SHA256 for SharedKey signing), base64 with padding.
//!
//! Validation tries two spellings of the URL, like the library: with its port removed and with
//! the scheme's default port added. JSON bodies are covered through a `bodySHA256` query
//! parameter carrying the lowercase hex SHA-256 of the raw body.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// The HMAC hash Twilio signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// HMAC-SHA1 keyed with the account's primary Auth Token (every voice webhook).
    #[default]
    Sha1,
    /// HMAC-SHA256 keyed with a SharedKey secret (`X-Twilio-Webhooks-Signature-Settings`,
    /// `algorithm=HMAC_SHA256`; a Twilio public beta).
    Sha256,
}

impl Algorithm {
    /// Length in bytes of the MAC this algorithm produces.
    pub const fn mac_len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
        }
    }

    /// Length of the MAC as padded base64, i.e. of a well-formed signature header.
    pub const fn signature_len(self) -> usize {
        self.mac_len().div_ceil(3) * 4
    }
}

/// The body of the request whose signature is being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedBody<'a> {
    /// An `application/x-www-form-urlencoded` body: URL-decoded `(name, value)` pairs in arrival
    /// order, duplicates kept.
    Form(&'a [(String, String)]),
    /// A raw JSON body, exactly as received; the URL must carry its `bodySHA256`.
    Json(&'a [u8]),
    /// No body (GET, or a POST without parameters): only the URL is signed.
    Empty,
}

/// Computes the base64 signature Twilio would send for `url` and form `params` (pass `&[]` for a
/// GET or a JSON body). `url` is used exactly as given; no port variants are tried.
pub fn compute(algorithm: Algorithm, key: &[u8], url: &str, params: &[(String, String)]) -> String {
    let sorted = sorted_unique(params);
    match signer(algorithm, key, url, &sorted) {
        Some(mac) => STANDARD.encode(mac.finalize()),
        None => String::new(),
    }
}

/// Checks an HMAC-SHA1 `X-Twilio-Signature` the way twilio-python 9.13.0 does. Never panics.
///
/// * `url` is the full URL as Twilio requested it (see [`public_url`]); the signature may match
///   it with its port removed or with the default port added (https/wss 443, http/ws 80).
/// * A [`SignedBody::Json`] body requires a `bodySHA256` query parameter equal to the lowercase
///   hex SHA-256 of the body; without one the request is invalid.
/// * A [`SignedBody::Form`] body is signed as form parameters even if the URL carries
///   `bodySHA256` (library behaviour); [`SignedBody::Empty`] never checks a body hash.
pub fn validate(key: &[u8], url: &str, body: SignedBody<'_>, signature: &str) -> bool {
    validate_with_algorithm(Algorithm::Sha1, key, url, body, signature)
}

/// [`validate`] with an explicit hash algorithm (HMAC-SHA256 for SharedKey signing).
pub fn validate_with_algorithm(
    algorithm: Algorithm,
    key: &[u8],
    url: &str,
    body: SignedBody<'_>,
    signature: &str,
) -> bool {
    let params: &[(String, String)] = match body {
        SignedBody::Form(pairs) => pairs,
        SignedBody::Empty => &[],
        SignedBody::Json(raw) => {
            let Some(expected) = query_param(url, "bodySHA256") else {
                return false;
            };
            let actual = sha256_hex(raw);
            if !bool::from(actual.as_slice().ct_eq(expected.as_bytes())) {
                return false;
            }
            &[]
        }
    };
    let mut presented = [0u8; 32];
    let Some(presented) = decode_signature(algorithm, signature, &mut presented) else {
        return false;
    };
    let sorted = sorted_unique(params);
    let (without_port, with_port) = url_variants(url);
    let a = verify(algorithm, key, &without_port, &sorted, presented);
    let b = verify(algorithm, key, &with_port, &sorted, presented);
    a | b
}

/// The URL Twilio requested (and signed), rebuilt from the configured public base URL (e.g.
/// `https://voice.example.com`, `http://127.0.0.1:8080`, or with a path prefix such as
/// `https://x.example/voxgate/`) and the request's raw path and query as received
/// (`/twilio/voice?tenant=acme`, percent-encoding untouched).
pub fn public_url(public_base: &str, path_and_query: &str) -> String {
    join(public_base.trim(), path_and_query)
}

/// Like [`public_url`], for the Media Streams WebSocket: `http` becomes `ws` and `https` becomes
/// `wss` (Twilio signs the `wss://` URL of the upgrade request).
pub fn websocket_url(public_base: &str, path_and_query: &str) -> String {
    let base = public_base.trim();
    let (scheme, rest) = match base.split_once("://") {
        Some((s, rest)) if s.eq_ignore_ascii_case("https") => ("wss", rest),
        Some((s, rest)) if s.eq_ignore_ascii_case("http") => ("ws", rest),
        _ => return join(base, path_and_query),
    };
    let mut ws = String::with_capacity(base.len() + 1);
    ws.push_str(scheme);
    ws.push_str("://");
    ws.push_str(rest);
    join(&ws, path_and_query)
}

fn join(base: &str, path_and_query: &str) -> String {
    let base = base.trim_end_matches('/');
    let mut url = String::with_capacity(base.len() + path_and_query.len() + 1);
    url.push_str(base);
    if !path_and_query.starts_with('/') {
        url.push('/');
    }
    url.push_str(path_and_query);
    url
}

/// Form pairs sorted by name then value (byte order, which for UTF-8 is Python's code-point
/// order), identical pairs collapsed as `sorted(set(values))` does in twilio-python.
fn sorted_unique(params: &[(String, String)]) -> Vec<(&str, &str)> {
    let mut v: Vec<(&str, &str)> = params.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    v.sort_unstable();
    v.dedup();
    v
}

enum Signer {
    Sha1(Hmac<Sha1>),
    Sha256(Hmac<Sha256>),
}

impl Signer {
    fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha1(m) => m.update(data),
            Self::Sha256(m) => m.update(data),
        }
    }

    fn finalize(self) -> Vec<u8> {
        match self {
            Self::Sha1(m) => m.finalize().into_bytes().to_vec(),
            Self::Sha256(m) => m.finalize().into_bytes().to_vec(),
        }
    }

    /// Constant-time comparison of the MAC with `tag`.
    fn verify(self, tag: &[u8]) -> bool {
        match self {
            Self::Sha1(m) => m.verify_slice(tag).is_ok(),
            Self::Sha256(m) => m.verify_slice(tag).is_ok(),
        }
    }
}

fn signer(algorithm: Algorithm, key: &[u8], url: &str, sorted: &[(&str, &str)]) -> Option<Signer> {
    // HMAC accepts keys of any length, so these never fail; no panic path either way.
    let mut s = match algorithm {
        Algorithm::Sha1 => Signer::Sha1(Hmac::<Sha1>::new_from_slice(key).ok()?),
        Algorithm::Sha256 => Signer::Sha256(Hmac::<Sha256>::new_from_slice(key).ok()?),
    };
    s.update(url.as_bytes());
    for (name, value) in sorted {
        s.update(name.as_bytes());
        s.update(value.as_bytes());
    }
    Some(s)
}

fn verify(algorithm: Algorithm, key: &[u8], url: &str, sorted: &[(&str, &str)], tag: &[u8]) -> bool {
    signer(algorithm, key, url, sorted).is_some_and(|s| s.verify(tag))
}

/// Decodes a presented signature into `buf`, returning the MAC bytes when the header is exactly
/// the canonical padded base64 of a MAC of the right length.
fn decode_signature<'b>(algorithm: Algorithm, signature: &str, buf: &'b mut [u8; 32]) -> Option<&'b [u8]> {
    if signature.len() != algorithm.signature_len() {
        return None;
    }
    let n = STANDARD.decode_slice(signature.as_bytes(), &mut buf[..]).ok()?;
    if n != algorithm.mac_len() {
        return None;
    }
    buf.get(..n)
}

fn sha256_hex(body: &[u8]) -> [u8; 64] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(body);
    let mut out = [0u8; 64];
    for (pair, byte) in out.chunks_exact_mut(2).zip(digest.iter()) {
        if let [hi, lo] = pair {
            *hi = HEX[usize::from(byte >> 4)];
            *lo = HEX[usize::from(byte & 0x0f)];
        }
    }
    out
}

/// First non-empty value of query parameter `name` (decoded like Python's `parse_qs`, which
/// drops blank values).
fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    form_urlencoded::parse(query.as_bytes()).find(|(n, v)| n == name && !v.is_empty()).map(|(_, v)| v.into_owned())
}

fn default_port(scheme: &str) -> Option<&'static str> {
    if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("wss") {
        Some("443")
    } else if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("ws") {
        Some("80")
    } else {
        None
    }
}

/// The two spellings of `url` the library signs: (port removed, default port added). When the
/// URL has a port, the second is the URL itself; when it has none, the first is.
fn url_variants(url: &str) -> (String, String) {
    let Some((scheme, after_scheme)) = url.split_once("://") else {
        return (url.to_owned(), url.to_owned());
    };
    let authority_len = after_scheme.find(['/', '?', '#']).unwrap_or(after_scheme.len());
    let (authority, rest) = after_scheme.split_at(authority_len);
    let (userinfo, hostport) = match authority.rfind('@') {
        Some(i) => authority.split_at(i + 1),
        None => ("", authority),
    };
    let host_end = if hostport.starts_with('[') {
        hostport.find(']').map_or(hostport.len(), |i| i + 1)
    } else {
        hostport.find(':').unwrap_or(hostport.len())
    };
    let (host, port) = hostport.split_at(host_end);
    let has_port = port.starts_with(':');
    let prefix_len = scheme.len() + 3 + userinfo.len() + host.len();
    let mut without = String::with_capacity(prefix_len + rest.len());
    without.push_str(scheme);
    without.push_str("://");
    without.push_str(userinfo);
    without.push_str(host);
    if !has_port {
        // `port` is empty here unless the host part is malformed; keep it verbatim then.
        without.push_str(port);
    }
    without.push_str(rest);
    let with = match (has_port, default_port(scheme)) {
        (false, Some(p)) if port.is_empty() => {
            let mut s = String::with_capacity(url.len() + 4);
            s.push_str(scheme);
            s.push_str("://");
            s.push_str(userinfo);
            s.push_str(host);
            s.push(':');
            s.push_str(p);
            s.push_str(rest);
            s
        }
        _ => url.to_owned(),
    };
    (without, with)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VECTORS: &str =
        include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/reference/twilio-signature-vectors.json"));

    struct Vector {
        name: String,
        token: String,
        url: String,
        params: Vec<(String, String)>,
        body: Option<String>,
        signature: String,
        valid: bool,
    }

    fn vectors() -> Vec<Vector> {
        let all: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .map(|v| {
                let s = |k: &str| v[k].as_str().unwrap().to_owned();
                let mut params = Vec::new();
                for (name, value) in v["params"].as_object().unwrap() {
                    match value {
                        serde_json::Value::String(x) => params.push((name.clone(), x.clone())),
                        serde_json::Value::Array(xs) => {
                            for x in xs {
                                params.push((name.clone(), x.as_str().unwrap().to_owned()));
                            }
                        }
                        other => panic!("unexpected param value {other}"),
                    }
                }
                Vector {
                    name: s("name"),
                    token: s("auth_token"),
                    url: s("url"),
                    params,
                    body: v["body"].as_str().map(str::to_owned),
                    signature: s("signature"),
                    valid: v["valid"].as_bool().unwrap(),
                }
            })
            .collect()
    }

    #[test]
    fn all_vectors_validate_as_expected() {
        let vs = vectors();
        assert_eq!(vs.len(), 18);
        for v in &vs {
            let key = v.token.as_bytes();
            match &v.body {
                Some(body) => {
                    assert!(v.params.is_empty(), "{}", v.name);
                    let got = validate(key, &v.url, SignedBody::Json(body.as_bytes()), &v.signature);
                    assert_eq!(got, v.valid, "{}", v.name);
                }
                None if v.params.is_empty() => {
                    let got = validate(key, &v.url, SignedBody::Empty, &v.signature);
                    assert_eq!(got, v.valid, "{} (Empty)", v.name);
                    let got = validate(key, &v.url, SignedBody::Form(&[]), &v.signature);
                    assert_eq!(got, v.valid, "{} (Form(&[]))", v.name);
                }
                None => {
                    let got = validate(key, &v.url, SignedBody::Form(&v.params), &v.signature);
                    assert_eq!(got, v.valid, "{}", v.name);
                    // arrival order must not matter
                    let mut rev = v.params.clone();
                    rev.reverse();
                    let got = validate(key, &v.url, SignedBody::Form(&rev), &v.signature);
                    assert_eq!(got, v.valid, "{} (reversed)", v.name);
                }
            }
        }
    }

    /// Which URL spelling each valid vector was signed over: the URL as given, the URL with its
    /// port removed, or with the default port added.
    #[test]
    fn compute_reproduces_valid_vectors() {
        let expected_variant = |name: &str| match name {
            "explicit-443-in-seen-url" | "nonstandard-port-signed-without-port" => "without_port",
            "port-added-by-validator" => "with_port",
            _ => "as_given",
        };
        for v in vectors().iter().filter(|v| v.valid) {
            let key = v.token.as_bytes();
            let (without, with) = url_variants(&v.url);
            let sign = |url: &str| compute(Algorithm::Sha1, key, url, &v.params);
            let variant = if sign(&v.url) == v.signature {
                "as_given"
            } else if sign(&without) == v.signature {
                "without_port"
            } else if sign(&with) == v.signature {
                "with_port"
            } else {
                panic!("{}: no URL variant reproduces the signature", v.name)
            };
            assert_eq!(variant, expected_variant(&v.name), "{}", v.name);
        }
    }

    #[test]
    fn sha256_sample_from_the_doc() {
        let v = vectors().into_iter().find(|v| v.name == "form-post-inbound-call").unwrap();
        let key = v.token.as_bytes();
        let sig = compute(Algorithm::Sha256, key, &v.url, &v.params);
        assert_eq!(sig, "glMfO7+HqahCWM1ubftm6+cL+ZUJZ4LKlBquTgvmNQk=");
        let body = SignedBody::Form(&v.params);
        assert!(validate_with_algorithm(Algorithm::Sha256, key, &v.url, body, &sig));
        // a SHA-256 signature is not a SHA-1 one, and vice versa
        assert!(!validate(key, &v.url, body, &sig));
        assert!(!validate_with_algorithm(Algorithm::Sha256, key, &v.url, body, &v.signature));
    }

    #[test]
    fn docs_signed_string() {
        // The signed string from Twilio's security page, fed directly.
        let s = "https://example.com/myapp.php?foo=1&bar=2CallSidCA1234567890ABCDECaller+14158675310Digits1234From+14158675310To+18005551212";
        assert_eq!(compute(Algorithm::Sha1, b"12345", s, &[]), "L/OH5YylLD5NRKLltdqwSvS0BnU=");
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    #[test]
    fn duplicate_values_collapse_and_sort() {
        let url = "https://h/x";
        let a = compute(Algorithm::Sha1, b"k", url, &pairs(&[("Tag", "b"), ("Tag", "a"), ("Tag", "b")]));
        let b = compute(Algorithm::Sha1, b"k", &format!("{url}TagaTagb"), &[]);
        assert_eq!(a, b);
        // names sort byte-wise: uppercase before lowercase
        let a = compute(Algorithm::Sha1, b"k", url, &pairs(&[("b", "1"), ("B", "2"), ("a", "3")]));
        let b = compute(Algorithm::Sha1, b"k", &format!("{url}B2a3b1"), &[]);
        assert_eq!(a, b);
    }

    #[test]
    fn json_body_rules() {
        let key = b"secret";
        let body = br#"{"a":1}"#;
        let hash = std::str::from_utf8(&sha256_hex(body)).unwrap().to_owned();
        let url = format!("https://h/events?bodySHA256={hash}");
        let sig = compute(Algorithm::Sha1, key, &url, &[]);
        assert!(validate(key, &url, SignedBody::Json(body), &sig));
        assert!(!validate(key, &url, SignedBody::Json(b"{}"), &sig));
        // uppercase hex in the URL does not match (the library compares strings)
        let upper = format!("https://h/events?bodySHA256={}", hash.to_uppercase());
        let sig_upper = compute(Algorithm::Sha1, key, &upper, &[]);
        assert!(!validate(key, &upper, SignedBody::Json(body), &sig_upper));
        // no bodySHA256 (or a blank one) ⇒ false, never a panic
        let bare = "https://h/events";
        let sig_bare = compute(Algorithm::Sha1, key, bare, &[]);
        assert!(!validate(key, bare, SignedBody::Json(body), &sig_bare));
        let blank = "https://h/events?bodySHA256=";
        let sig_blank = compute(Algorithm::Sha1, key, blank, &[]);
        assert!(!validate(key, blank, SignedBody::Json(b""), &sig_blank));
        // form params with a bodySHA256 URL are validated as a form
        let form = pairs(&[("A", "1")]);
        let sig_form = compute(Algorithm::Sha1, key, &url, &form);
        assert!(validate(key, &url, SignedBody::Form(&form), &sig_form));
        // a fragment is not part of the hash value
        let frag = format!("{url}#x");
        let sig_frag = compute(Algorithm::Sha1, key, &frag, &[]);
        assert!(validate(key, &frag, SignedBody::Json(body), &sig_frag));
    }

    #[test]
    fn url_variant_spellings() {
        let v = |u: &str| url_variants(u);
        assert_eq!(v("https://h/x?a=1"), ("https://h/x?a=1".into(), "https://h:443/x?a=1".into()));
        assert_eq!(v("https://h:443/x"), ("https://h/x".into(), "https://h:443/x".into()));
        assert_eq!(v("http://h"), ("http://h".into(), "http://h:80".into()));
        assert_eq!(v("http://h:8080/x"), ("http://h/x".into(), "http://h:8080/x".into()));
        assert_eq!(v("wss://h/media"), ("wss://h/media".into(), "wss://h:443/media".into()));
        assert_eq!(v("ws://h/media"), ("ws://h/media".into(), "ws://h:80/media".into()));
        assert_eq!(v("https://u:p@h:443/x"), ("https://u:p@h/x".into(), "https://u:p@h:443/x".into()));
        assert_eq!(v("http://[::1]:8080/x"), ("http://[::1]/x".into(), "http://[::1]:8080/x".into()));
        assert_eq!(v("http://[::1]/x"), ("http://[::1]/x".into(), "http://[::1]:80/x".into()));
        assert_eq!(v("ftp://h/x"), ("ftp://h/x".into(), "ftp://h/x".into()));
        assert_eq!(v("no-scheme"), ("no-scheme".into(), "no-scheme".into()));
        assert_eq!(v("https://h?q=a:b"), ("https://h?q=a:b".into(), "https://h:443?q=a:b".into()));
    }

    #[test]
    fn websocket_handshake_signed_with_443() {
        // wss gets 443 (not the library's :80 quirk)
        let key = b"k";
        let sig = compute(Algorithm::Sha1, key, "wss://h:443/media", &[]);
        assert!(validate(key, "wss://h/media", SignedBody::Empty, &sig));
        let sig80 = compute(Algorithm::Sha1, key, "wss://h:80/media", &[]);
        assert!(!validate(key, "wss://h/media", SignedBody::Empty, &sig80));
    }

    #[test]
    fn rejects_malformed_signatures() {
        let key = b"k";
        let url = "https://h/x";
        let good = compute(Algorithm::Sha1, key, url, &[]);
        assert!(validate(key, url, SignedBody::Empty, &good));
        for bad in [
            String::new(),
            " ".to_owned() + &good,
            good.trim_end_matches('=').to_owned(),
            format!("{good}="),
            good.to_lowercase(),
            "é".repeat(14),
            "A".repeat(28),
        ] {
            assert!(!validate(key, url, SignedBody::Empty, &bad), "{bad:?}");
        }
        // wrong key
        assert!(!validate(b"K", url, SignedBody::Empty, &good));
    }

    #[test]
    fn builds_public_urls() {
        assert_eq!(
            public_url("https://voice.example.com", "/twilio/voice?a=%2B1"),
            "https://voice.example.com/twilio/voice?a=%2B1"
        );
        assert_eq!(public_url("https://voice.example.com/", "/twilio/voice"), "https://voice.example.com/twilio/voice");
        assert_eq!(public_url("http://127.0.0.1:8080", "/twilio/voice"), "http://127.0.0.1:8080/twilio/voice");
        assert_eq!(public_url("https://x.example/voxgate", "/twilio/voice"), "https://x.example/voxgate/twilio/voice");
        assert_eq!(public_url("https://x.example/voxgate/", "/twilio/voice"), "https://x.example/voxgate/twilio/voice");
        assert_eq!(public_url(" https://x.example ", "twilio/voice"), "https://x.example/twilio/voice");
        assert_eq!(public_url("https://x.example", "/"), "https://x.example/");
        assert_eq!(websocket_url("https://voice.example.com/", "/media"), "wss://voice.example.com/media");
        assert_eq!(websocket_url("http://127.0.0.1:8080", "/media"), "ws://127.0.0.1:8080/media");
        assert_eq!(websocket_url("HTTPS://x.example/voxgate", "/media"), "wss://x.example/voxgate/media");
        assert_eq!(websocket_url("wss://x.example", "/media"), "wss://x.example/media");
    }

    fn url_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,60}",
            "(https?|wss?|HTTP|x)?(://)?([a-z0-9]{0,3}@)?(\\[[0-9:]{0,6}\\]?|[a-z.]{0,8})(:[0-9a-z]{0,6})?(/[a-z/]{0,8})?(\\?[a-zA-Z0-9=&%#]{0,20})?",
            "https://h/e\\?bodySHA256=[0-9a-f]{0,64}",
        ]
    }

    proptest! {
        #[test]
        fn validate_never_panics(
            key in proptest::collection::vec(any::<u8>(), 0..80),
            url in url_strategy(),
            form in proptest::collection::vec((".{0,8}", ".{0,8}"), 0..6),
            raw in proptest::collection::vec(any::<u8>(), 0..40),
            kind in 0u8..3,
            sig in prop_oneof![".{0,50}", "[A-Za-z0-9+/=]{26,46}"],
            sha256 in any::<bool>(),
        ) {
            let body = match kind {
                0 => SignedBody::Form(&form),
                1 => SignedBody::Json(&raw),
                _ => SignedBody::Empty,
            };
            let alg = if sha256 { Algorithm::Sha256 } else { Algorithm::Sha1 };
            let _ = validate_with_algorithm(alg, &key, &url, body, &sig);
            let _ = public_url(&url, &sig);
            let _ = websocket_url(&url, &sig);
        }

        #[test]
        fn computed_signatures_validate(
            key in proptest::collection::vec(any::<u8>(), 0..40),
            path in "/[a-z/]{0,10}",
            port in prop_oneof![Just(""), Just(":443")],
            form in proptest::collection::vec(("[A-Za-z]{1,4}", ".{0,6}"), 0..6),
        ) {
            let signed = format!("https://h.example{port}{path}");
            let sig = compute(Algorithm::Sha1, &key, &signed, &form);
            prop_assert!(validate(&key, &signed, SignedBody::Form(&form), &sig));
            // seen with the other spelling of the port
            let seen = if port.is_empty() { format!("https://h.example:443{path}") } else { format!("https://h.example{path}") };
            prop_assert!(validate(&key, &seen, SignedBody::Form(&form), &sig));
        }
    }
}
