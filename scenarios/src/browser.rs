//! A real browser for the console's end-to-end tests: Debian's Chromium, headless, driven through
//! ChromeDriver over the W3C WebDriver protocol (plain JSON over HTTP, a few commands).
//!
//! `Browser::start` runs `chromedriver` on a free loopback port and opens a session with a fresh
//! profile; dropping it ends the session and stops the driver. Everything waits on facts (an
//! element present, a text shown) with a deadline, never a fixed sleep.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A Chromium under ChromeDriver.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempfile::TempDir,
}

/// Where Debian puts them (`apt-get install chromium chromium-driver`); `CHROMIUM` and
/// `CHROMEDRIVER` override.
fn paths() -> (String, String) {
    (
        std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
        std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into()),
    )
}

impl Browser {
    pub async fn start() -> anyhow::Result<Self> {
        let (chromium, chromedriver) = paths();
        if !std::path::Path::new(&chromedriver).exists() || !std::path::Path::new(&chromium).exists() {
            bail!("{chromium} or {chromedriver} is missing: apt-get install chromium chromium-driver (.ci/run does)");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {chromedriver}"))?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        let profile = tempfile::tempdir()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http.get(format!("{base}/status")).send().await.ok();
            if let Some(r) = ready {
                let v: Value = serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
                if v["value"]["ready"].as_bool() == Some(true) {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not become ready on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--window-size=1400,1000", "--autoplay-policy=no-user-gesture-required",
                        "--no-first-run", "--disable-extensions",
                        format!("--user-data-dir={}", profile.path().display()),
                    ]
                }
            }}
        });
        let r = http
            .post(format!("{base}/session"))
            .header("content-type", "application/json")
            .body(caps.to_string())
            .send()
            .await?;
        let r: Value = serde_json::from_str(&r.text().await?)?;
        let session = r["value"]["sessionId"].as_str().ok_or_else(|| anyhow!("no WebDriver session: {r}"))?.to_owned();
        Ok(Self { driver, base, session, http, _profile: profile })
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let v: Value = serde_json::from_str(&req.send().await?.text().await?)?;
        if let Some(err) = v["value"]["error"].as_str() {
            bail!("WebDriver {path}: {err}: {}", v["value"]["message"].as_str().unwrap_or_default());
        }
        Ok(v["value"].clone())
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await.map(|_| ())
    }

    pub async fn url(&self) -> anyhow::Result<String> {
        Ok(self.cmd(reqwest::Method::GET, "/url", None).await?.as_str().unwrap_or_default().to_owned())
    }

    pub async fn source(&self) -> anyhow::Result<String> {
        Ok(self.cmd(reqwest::Method::GET, "/source", None).await?.as_str().unwrap_or_default().to_owned())
    }

    /// The elements matching a CSS selector now.
    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<String>> {
        let v = self
            .cmd(reqwest::Method::POST, "/elements", Some(json!({ "using": "css selector", "value": css })))
            .await?;
        Ok(v.as_array()
            .map(|a| a.iter().filter_map(|e| e[ELEMENT].as_str().map(str::to_owned)).collect())
            .unwrap_or_default())
    }

    /// The first element matching `css`, waiting up to `within` for it to appear.
    pub async fn wait_for(&self, css: &str, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(e) = self.find_all(css).await?.into_iter().next() {
                return Ok(e);
            }
            if Instant::now() > deadline {
                bail!("no element {css:?} within {within:?} on {}", self.url().await.unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the text of the first element matching `css` satisfies `pred`; returns it.
    pub async fn wait_text(&self, css: &str, within: Duration, pred: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(e) = self.find_all(css).await?.into_iter().next() {
                let t = self.text(&e).await.unwrap_or_default();
                if pred(&t) {
                    return Ok(t);
                }
            }
            if Instant::now() > deadline {
                bail!("{css:?} did not show the expected text within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn text(&self, element: &str) -> anyhow::Result<String> {
        Ok(self
            .cmd(reqwest::Method::GET, &format!("/element/{element}/text"), None)
            .await?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub async fn click(&self, element: &str) -> anyhow::Result<()> {
        self.cmd(reqwest::Method::POST, &format!("/element/{element}/click"), Some(json!({}))).await.map(|_| ())
    }

    pub async fn type_into(&self, element: &str, text: &str) -> anyhow::Result<()> {
        self.cmd(reqwest::Method::POST, &format!("/element/{element}/clear"), Some(json!({}))).await?;
        self.cmd(reqwest::Method::POST, &format!("/element/{element}/value"), Some(json!({ "text": text })))
            .await
            .map(|_| ())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; returns its value.
    pub async fn eval(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.cmd(reqwest::Method::POST, "/execute/sync", Some(json!({ "script": script, "args": args }))).await
    }

    /// Runs an asynchronous script: it calls `arguments[arguments.length - 1]` with its result.
    pub async fn eval_async(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.cmd(reqwest::Method::POST, "/execute/async", Some(json!({ "script": script, "args": args }))).await
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        use base64::Engine;
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await?;
        Ok(base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default())?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The session's Chromium goes with the driver's process group; ask politely first.
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    let c = reqwest::Client::new();
                    let _ = tokio::time::timeout(Duration::from_secs(5), c.delete(url).send()).await;
                });
            }
        })
        .join();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
