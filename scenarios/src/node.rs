//! Start and stop a real `voxgate serve` for a scenario: free loopback ports, a temp data dir,
//! logs captured to a file, SIGTERM on stop and kill on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The `voxgate` binary: `VOXGATE_TEST_BIN` if set, else the one cargo built beside the running
/// executable (`target/<profile>/voxgate`: `cargo test --workspace` builds it for the scenario
/// tests, `cargo build --release --workspace` for the bench binaries). No nested cargo build.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("VOXGATE_TEST_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    // A test runs from target/<profile>/deps/, a bench binary from target/<profile>/.
    let dirs = exe.ancestors().skip(1).take(2);
    let candidates: Vec<PathBuf> = dirs.map(|d| d.join(format!("voxgate{}", std::env::consts::EXE_SUFFIX))).collect();
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "no voxgate binary at {}: build it first (`cargo test --workspace` builds it for the tests, \
             `cargo build --release --workspace` for the benches) or set VOXGATE_TEST_BIN",
            candidates.first().map(|p| p.display().to_string()).unwrap_or_default()
        )
    })
}

/// The Whisper model fetched by nodes/deploy/fetch-model.sh (or `VOXGATE_STT__MODEL_DIR`).
pub fn model_dir() -> PathBuf {
    match std::env::var("VOXGATE_STT__MODEL_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/whisper-tiny.en"),
    }
}

/// Whether every stage in a health answer has read all of its input log (`lag_events` 0).
fn stages_caught_up(health: &serde_json::Value) -> bool {
    health["stages"].as_object().is_some_and(|m| m.values().all(|s| s["lag_events"].as_u64() == Some(0)))
}

/// A running voxgate.
pub struct Node {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl Node {
    /// Writes `config` (TOML; `public_url` etc. as the test wants) and starts `voxgate serve`.
    pub fn start(config: &str) -> anyhow::Result<Node> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("voxgate.toml");
        std::fs::write(&config_path, config)?;
        Self::start_in(dir, config_path, &[])
    }

    /// Starts `voxgate serve` on an existing data dir (restart scenarios).
    pub fn start_in(dir: tempfile::TempDir, config_path: PathBuf, env: &[(&str, &str)]) -> anyhow::Result<Node> {
        let log_path = dir
            .path()
            .join(format!("voxgate-{}.log", Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id())));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut child = Command::new(binary()?)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .env("VOXGATE_STT__MODEL_DIR", model_dir())
            // Tests move the node's clock forward instead of waiting (`Node::advance_clock`).
            .env("VOXGATE_TEST_CLOCK", "manual")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .context("spawning voxgate serve")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("voxgate ready") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("voxgate did not become ready; its log:\n{log}");
            }
        };
        let field = |name: &str| -> anyhow::Result<SocketAddr> {
            let v = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix(name))
                .with_context(|| format!("no {name} in {line:?}"))?;
            Ok(v.parse()?)
        };
        Ok(Node {
            addr: field("listen=")?,
            metrics: field("metrics=")?,
            child: Some(child),
            dir,
            config_path,
            log_path,
        })
    }

    /// The process id of the running node.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The node's log lines so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// GET a path on the main listener as JSON.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let r = reqwest::get(format!("{}{}", self.url(), path)).await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok((status, serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?))
    }

    /// Moves the node's clock forward by `by` (a call "lasts" that much longer without the test
    /// waiting for it).
    pub async fn advance_clock(&self, by: Duration) -> anyhow::Result<()> {
        let r = reqwest::Client::new()
            .post(format!("{}/api/voice/test/clock", self.url()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("AdvanceMs={}", by.as_millis()))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("advancing the clock: HTTP {}", r.status());
        }
        Ok(())
    }

    /// The Prometheus text from the metrics listener.
    pub async fn scrape(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("http://{}/metrics", self.metrics)).await?.text().await?)
    }

    /// Waits (bounded) until no call is active and every stage has consumed its input.
    pub async fn wait_idle(&self, within: Duration) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let (_, h) = self.get_json("/api/voice/health").await?;
            let calls_done = h["active_calls"].as_u64() == Some(0);
            if calls_done && stages_caught_up(&h) {
                return Ok(h);
            }
            if Instant::now() > deadline {
                bail!("node not idle after {within:?}: {h}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) until every stage has read all of its input log (`lag_events` 0) and every
    /// hang-up a stage decided has had Twilio's answer (`voxgate_hangups_total` caught up with
    /// `voxgate_hangups_requested_total`); calls may still be live.
    pub async fn wait_caught_up(&self, within: Duration) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + within;
        loop {
            let (_, h) = self.get_json("/api/voice/health").await?;
            let lag_done = stages_caught_up(&h);
            let m = self.scrape().await?;
            let hangups_done = crate::load::counter(&m, "voxgate_hangups_total")
                >= crate::load::counter(&m, "voxgate_hangups_requested_total");
            if lag_done && hangups_done {
                return Ok(h);
            }
            if Instant::now() > deadline {
                bail!("node not caught up after {within:?}: {h}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else { bail!("already stopped") };
        Command::new("kill").arg("-TERM").arg(child.id().to_string()).status()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("voxgate did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, no goodbye (crash scenarios).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `voxgate <args>` against this node's config and data dir (the node must be stopped).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(Command::new(binary()?)
            .env("VOXGATE_STT__MODEL_DIR", model_dir())
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .output()?)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}
