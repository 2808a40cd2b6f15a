//! The console in a real browser (Debian's Chromium through ChromeDriver) against the real binary:
//! a tenant signs in, sees a live call appear, follows its conversation as it is transcribed
//! (both speakers), plays a speech segment, opens the inspector and re-sends a request to its app;
//! another tenant sees none of it. And the bad input around it, over plain HTTP: wrong tokens,
//! throttled guessing, forms without their CSRF token, guessed CallSids, script in names, a long
//! timeline paged.

use std::time::{Duration, Instant};

use serde_json::json;
use voxgate_protocol::{AccountSid, CallSid, StreamSid};
use voxgate_scenarios::app::CustomerApp;
use voxgate_scenarios::browser::Browser;
use voxgate_scenarios::fixture::{ACCOUNT, PUBLIC, TOKEN};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::twilio::{extract_attr, Pace, Simulator};

const GW_NUMBER: &str = "+14155550170";
const OTHER: &str = "AC0000000000000000000000000000beef";
const OTHER_TOKEN: &str = "0badc0de0badc0de0badc0de0badc0de";
const OTHER_NUMBER: &str = "+14155550199";
const ADMIN: &str = "admin-console-test-0123456789abcdef";

fn config(app: &CustomerApp) -> String {
    format!(
        "public_url = \"{PUBLIC}\"\nallow_private_callbacks = true\nadmin_token = \"{ADMIN}\"\n\
[[tenants]]\naccount_sid = \"{ACCOUNT}\"\nauth_token = \"{TOKEN}\"\nfriendly_name = \"Acme <b>Support</b>\"\n\
numbers = [{{ number = \"{GW_NUMBER}\", voice_url = \"{}/voice\", status_callback = \"{}/status\" }}]\n\
[[tenants]]\naccount_sid = \"{OTHER}\"\nauth_token = \"{OTHER_TOKEN}\"\nfriendly_name = \"<script>window.pwned = 1</script>\"\nnumbers = [\"{OTHER_NUMBER}\"]\n",
        app.url, app.url
    )
}

async fn sign_in(b: &Browser, node: &Node, account: &str, token: &str) -> anyhow::Result<()> {
    b.goto(&format!("{}/console/login", node.url())).await?;
    let a = b.wait_for("#account", Duration::from_secs(10)).await?;
    b.type_into(&a, account).await?;
    let t = b.wait_for("#token", Duration::from_secs(10)).await?;
    b.type_into(&t, token).await?;
    let go = b.wait_for("#sign-in", Duration::from_secs(10)).await?;
    b.click(&go).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_follows_its_calls_in_a_browser_and_sees_no_one_elses() {
    let app = CustomerApp::start(TOKEN).await.unwrap();
    let mut node = Node::start(&config(&app)).unwrap();
    let s = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(ACCOUNT).unwrap(), TOKEN);
    let work = tempfile::tempdir().unwrap();
    let (caller, agent) = voxgate_scenarios::app::conversation(work.path()).unwrap();
    let b = Browser::start().await.unwrap();
    let shots = std::env::var("CONSOLE_SCREENSHOTS").ok();
    let shot = |name: &'static str| {
        let dir = shots.clone();
        let b = &b;
        async move {
            if let Some(d) = dir {
                let png = b.screenshot().await.unwrap();
                std::fs::write(format!("{d}/console-{name}.png"), png).unwrap();
            }
        }
    };

    // A wrong token is refused, and says so.
    sign_in(&b, &node, ACCOUNT, "ffffffffffffffffffffffffffffffff").await.unwrap();
    let err = b.wait_text("#login-error", Duration::from_secs(10), |t| !t.is_empty()).await.unwrap();
    assert!(err.contains("not accepted"), "{err}");
    sign_in(&b, &node, ACCOUNT, TOKEN).await.unwrap();
    b.wait_for("table#calls[data-live='1']", Duration::from_secs(10)).await.unwrap();

    // A call comes in while the tenant watches the live list: it appears by itself.
    let call = CallSid::from_u128(0xc0_5013);
    let a = s.inbound_call(call, "+14155551234", GW_NUMBER).await.unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
    b.wait_for(&format!("#call-{call}"), Duration::from_secs(20)).await.unwrap();
    let url = extract_attr(&a.body, "<Stream ", "url").unwrap();
    let mut stream = s.connect_stream(&url).await.unwrap();
    let sid = StreamSid::from_u128(call.as_u128() ^ 0x5a5a);
    stream.start_both(sid, s.account(), call).await.unwrap();
    b.wait_text(&format!("#call-{call} td.tracks"), Duration::from_secs(20), |t| t.contains("inbound")).await.unwrap();
    shot("live-calls").await;

    // Open it and follow the conversation as it is transcribed: both speakers, live.
    let row_link = b.wait_for(&format!("#call-{call} a"), Duration::from_secs(5)).await.unwrap();
    b.click(&row_link).await.unwrap();
    b.wait_for("#conversation[data-live='1']", Duration::from_secs(10)).await.unwrap();
    let audio = tokio::spawn(async move {
        stream.send_two_tracks(sid, &caller.mulaw, &agent.mulaw, Pace::Faster(2)).await.unwrap();
        (stream, sid)
    });
    let lines = "#conversation li.line:not(.partial)";
    b.wait_for(&format!("{lines}[data-track='inbound']"), Duration::from_secs(120)).await.unwrap();
    b.wait_for(&format!("{lines}[data-track='outbound']"), Duration::from_secs(120)).await.unwrap();
    let (mut stream, sid) = audio.await.unwrap();
    shot("conversation").await;
    stream.stop(sid, s.account(), call).await.unwrap();
    stream.closed(Duration::from_secs(10)).await;
    node.advance_clock(Duration::from_secs(30)).await.unwrap();
    assert_eq!(s.status_callback(call, "completed", 3, Some(25)).await.unwrap(), 204);
    b.wait_text("#call-state", Duration::from_secs(20), |t| t == "completed").await.unwrap();
    let delays = b.eval("return window.voxgateDelays;", json!([])).await.unwrap();
    assert!(!delays.as_array().unwrap().is_empty(), "transcripts arrived live");

    // The timeline of the ended call: every event, and its speech segments play in the browser.
    node.wait_idle(Duration::from_secs(120)).await.unwrap();
    b.goto(&format!("{}/console/calls/{call}", node.url())).await.unwrap();
    b.wait_for("#timeline tr.ev.app_exchange", Duration::from_secs(10)).await.unwrap();
    let played = b
        .eval_async(
            "const done = arguments[arguments.length - 1];\
             const a = document.querySelector('audio.segment');\
             if (!a) { done('no audio element'); return; }\
             a.addEventListener('error', () => done('error ' + (a.error && a.error.code)));\
             a.play().then(() => done('playing ' + a.duration.toFixed(2))).catch((e) => done('refused ' + e));",
            json!([]),
        )
        .await
        .unwrap();
    let played = played.as_str().unwrap_or_default().to_owned();
    assert!(played.starts_with("playing"), "{played}");
    let secs: f64 = played.trim_start_matches("playing ").parse().unwrap();
    assert!(secs > 0.3, "a speech segment lasts: {secs}");
    shot("timeline").await;

    // The inspector: the voice webhook's exchange, opened and sent again.
    b.goto(&format!("{}/console/inspector", node.url())).await.unwrap();
    b.wait_for("#exchanges tbody tr", Duration::from_secs(10)).await.unwrap();
    shot("inspector").await;
    let src = b.source().await.unwrap();
    assert!(src.contains(&call.to_string()));
    let voice_hits = app.hits_to("/voice").len();
    let open = b
        .eval(
            "return [...document.querySelectorAll('#exchanges tbody tr')].filter(r => r.children[2].textContent === 'voice').map(r => r.querySelector('a.open').href)[0];",
            json!([]),
        )
        .await
        .unwrap();
    b.goto(open.as_str().unwrap()).await.unwrap();
    let params = b.wait_text("#params", Duration::from_secs(10), |t| t.contains("CallSid")).await.unwrap();
    assert!(params.contains(&call.to_string()), "{params}");
    let resend = b.wait_for("#resend-button", Duration::from_secs(5)).await.unwrap();
    b.click(&resend).await.unwrap();
    let now = b.wait_text("#new-status", Duration::from_secs(20), |t| !t.is_empty()).await.unwrap();
    assert!(now.starts_with("HTTP 200"), "{now}");
    let new_answer = b.wait_text("#new-answer", Duration::from_secs(5), |t| !t.is_empty()).await.unwrap();
    assert!(new_answer.contains("<Response>"), "{new_answer}");
    let old_answer = b.wait_text("#old-answer", Duration::from_secs(5), |t| !t.is_empty()).await.unwrap();
    assert!(old_answer.contains("<Response>"), "{old_answer}");
    app.wait_until(Duration::from_secs(10), |h| h.iter().filter(|x| x.path == "/voice").count() > voice_hits).await;
    let again = app.hits_to("/voice");
    assert!(again.last().unwrap().signature_valid, "the re-sent request is signed as Twilio signs");
    shot("resend").await;

    // Spend and fraud pages render for the tenant; the friendly name is text, not markup.
    b.goto(&format!("{}/console/spend", node.url())).await.unwrap();
    let spend = b.wait_text("#spend", Duration::from_secs(10), |t| t.contains("Acme")).await.unwrap();
    assert!(spend.contains("Acme <b>Support</b>"), "{spend}");
    shot("spend").await;
    b.goto(&format!("{}/console/fraud", node.url())).await.unwrap();
    b.wait_for("#blocks", Duration::from_secs(10)).await.unwrap();
    assert!(b.find_all("#block").await.unwrap().is_empty(), "blocking needs the admin token");

    // Another tenant sees nothing of it: not in the list, not by its CallSid, not its audio.
    let out = b.wait_for("#sign-out", Duration::from_secs(5)).await.unwrap();
    b.click(&out).await.unwrap();
    b.wait_for("#login", Duration::from_secs(10)).await.unwrap();
    sign_in(&b, &node, OTHER, OTHER_TOKEN).await.unwrap();
    b.wait_for("table#calls", Duration::from_secs(10)).await.unwrap();
    b.goto(&format!("{}/console/calls?show=all", node.url())).await.unwrap();
    b.wait_for("#no-calls", Duration::from_secs(10)).await.unwrap();
    b.goto(&format!("{}/console/calls/{call}", node.url())).await.unwrap();
    let e = b.wait_text("#error", Duration::from_secs(10), |t| !t.is_empty()).await.unwrap();
    assert_eq!(e, "There is no such call.");
    let foreign = b
        .eval_async(
            "const done = arguments[arguments.length - 1];\
             fetch(arguments[0]).then(r => done(r.status)).catch(e => done(String(e)));",
            json!([format!("/console/calls/{call}/segments/0")]),
        )
        .await
        .unwrap();
    assert_eq!(foreign, json!(404));
    b.goto(&format!("{}/console/inspector", node.url())).await.unwrap();
    b.wait_for("#exchanges", Duration::from_secs(10)).await.unwrap();
    assert!(!b.source().await.unwrap().contains(&call.to_string()), "no exchange of another tenant");
    // Its own friendly name is script: shown as text, never run.
    b.goto(&format!("{}/console/spend", node.url())).await.unwrap();
    let mine = b.wait_text("#spend", Duration::from_secs(10), |t| t.contains("script")).await.unwrap();
    assert!(mine.contains("<script>window.pwned = 1</script>"), "{mine}");
    assert!(!mine.contains("Acme"), "only its own account");
    assert_eq!(b.eval("return window.pwned === undefined;", json!([])).await.unwrap(), json!(true));

    // The operator blocks a number in the console; the tenant's REST API sees it.
    let out = b.wait_for("#sign-out", Duration::from_secs(5)).await.unwrap();
    b.click(&out).await.unwrap();
    sign_in(&b, &node, "", ADMIN).await.unwrap();
    b.wait_for("table#calls", Duration::from_secs(10)).await.unwrap();
    b.goto(&format!("{}/console/fraud", node.url())).await.unwrap();
    let form = b.wait_for("#block input[name='number']", Duration::from_secs(10)).await.unwrap();
    b.type_into(&form, "+19005550123").await.unwrap();
    let go = b.wait_for("#block button", Duration::from_secs(5)).await.unwrap();
    b.click(&go).await.unwrap();
    b.wait_for("#blocks tr[data-number='+19005550123']", Duration::from_secs(10)).await.unwrap();
    shot("fraud").await;
    drop(b);
    assert!(node.stop().unwrap().success());
}

/// The console's answers to bad input, over plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_plainly() {
    let app = CustomerApp::start(TOKEN).await.unwrap();
    let mut node = Node::start(&config(&app)).unwrap();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let u = |p: &str| format!("{}{p}", node.url());

    // Not signed in: pages send you to sign in, the event stream and audio say 401.
    let r = http.get(u("/console/calls")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert!(r.headers()["location"].to_str().unwrap().starts_with("/console/login"));
    // The sign-in page says why from a fixed list: a link cannot make it show its own text.
    let page =
        http.get(u("/console/login?why=Call%20%2B1-900-555-0199%20now")).send().await.unwrap().text().await.unwrap();
    assert!(!page.contains("900-555") && !page.contains("login-error"), "{page}");
    let page = http.get(u("/console/login?why=expired")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("Your session has expired"));
    assert_eq!(http.get(u("/console/events")).send().await.unwrap().status().as_u16(), 401);
    // A forged or expired cookie is the same as none.
    let r = http
        .get(u("/console/events"))
        .header("cookie", format!("voxgate_console={}", "a".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // Sign in: the cookie is HttpOnly and SameSite=Strict (and Secure, public_url being https).
    let r = http.post(u("/console/login")).form(&[("account", ACCOUNT), ("token", TOKEN)]).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Secure"), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_owned();
    let page = http.get(u("/console/fraud")).header("cookie", &session).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));

    // A change without the session's CSRF token is refused and changes nothing.
    let r = http
        .post(u("/console/logout"))
        .header("cookie", &session)
        .form(&[("csrf", "not-the-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(http.get(u("/console/calls")).header("cookie", &session).send().await.unwrap().status().as_u16(), 200);
    // A tenant cannot block numbers even with a valid form.
    let html = http.get(u("/console/calls")).header("cookie", &session).send().await.unwrap().text().await.unwrap();
    let csrf = html.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let r = http
        .post(u("/console/fraud/block"))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str()), ("tenant", ACCOUNT), ("number", "+19005550000")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // Guessed or malformed CallSids look the same as missing ones.
    for path in ["/console/calls/CA00000000000000000000000000000001", "/console/calls/nope", "/console/inspector/EV0"] {
        let r = http.get(u(path)).header("cookie", &session).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 404, "{path}");
    }
    let r = http.get(u("/console/calls?since=yesterday")).header("cookie", &session).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // A long call's timeline comes in pages.
    let s = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(ACCOUNT).unwrap(), TOKEN);
    let call = CallSid::from_u128(0xc0_10_aa);
    let a = s.inbound_call(call, "+14155552222", GW_NUMBER).await.unwrap();
    let url = extract_attr(&a.body, "<Stream ", "url").unwrap();
    let mut stream = s.connect_stream(&url).await.unwrap();
    let sid = StreamSid::from_u128(0xc0_10_aa);
    stream.start(sid, s.account(), call).await.unwrap();
    for i in 0..260 {
        let dtmf = json!({"event": "dtmf", "streamSid": sid.to_string(), "sequenceNumber": (i + 2).to_string(), "dtmf": {"track": "inbound_track", "digit": "5"}});
        stream.send_raw(&dtmf.to_string()).await.unwrap();
    }
    stream.stop(sid, s.account(), call).await.unwrap();
    stream.closed(Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let html = |path: String| {
        let (http, session) = (&http, &session);
        async move { http.get(path).header("cookie", session).send().await.unwrap().text().await.unwrap() }
    };
    loop {
        if html(u(&format!("/console/calls/{call}"))).await.contains("id=\"next\"") {
            let second = html(u(&format!("/console/calls/{call}?page=1"))).await;
            assert!(second.contains("id=\"prev\"") && second.contains("digit 5"));
            break;
        }
        assert!(Instant::now() < deadline, "the timeline never reached two pages");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Guessing tokens is throttled: after the lockout's failures, even the right token waits.
    for _ in 0..10 {
        let r = http.post(u("/console/login")).form(&[("account", OTHER), ("token", "wrong")]).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }
    let r = http.post(u("/console/login")).form(&[("account", OTHER), ("token", OTHER_TOKEN)]).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let scrape = node.scrape().await.unwrap();
    assert!(scrape.contains("voxgate_console_sign_in_total{outcome=\"locked_out\"}"), "a metric counts it");
    assert!(node.stop().unwrap().success());
}
