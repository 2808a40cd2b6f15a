//! Start and stop a real `voxgate serve` for a scenario: free loopback ports, a temp data dir,
//! logs captured to a file, SIGTERM on stop and kill on drop.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The `voxgate` binary: `VOXGATE_TEST_BIN` if set, else built once with cargo (a no-op when fresh).
pub fn binary() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("VOXGATE_TEST_BIN") {
            return Ok(PathBuf::from(p));
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("no workspace root")?.to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let profile_release = std::env::var("VOXGATE_TEST_RELEASE").is_ok();
        let mut cmd = Command::new(cargo);
        // The targets `cargo test --workspace` builds, so features unify as they did there and a
        // fresh build stays fresh (`-p voxgate` alone would rebuild it with other features).
        cmd.current_dir(&root).args(["build", "-q", "--workspace"]);
        // What `cargo test` sets for this crate's tests (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, …):
        // a build script (ring's) watches some of them, and seeing them change would rebuild
        // half the tree here and again at the next top-level build.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "OUT_DIR",
                ]
                .contains(&k.as_ref())
            {
                cmd.env_remove(k.as_ref());
            }
        }
        if profile_release {
            cmd.args(["--release", "--bin", "voxgate"]);
        } else {
            cmd.args(["--bins", "--tests"]);
        }
        let st = cmd.status().map_err(|e| format!("running cargo build: {e}"))?;
        if !st.success() {
            return Err(format!("cargo build --bin voxgate failed: {st}"));
        }
        let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| root.join("target"));
        Ok(target.join(if profile_release { "release" } else { "debug" }).join("voxgate"))
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// The Whisper model fetched by nodes/deploy/fetch-model.sh (or `VOXGATE_STT__MODEL_DIR`).
pub fn model_dir() -> PathBuf {
    match std::env::var("VOXGATE_STT__MODEL_DIR") {
        Ok(d) => PathBuf::from(d),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/whisper-tiny.en"),
    }
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
            let lag_done = h["stages"]
                .as_object()
                .map(|m| m.values().all(|s| s["lag_events"].as_u64() == Some(0)))
                .unwrap_or(false);
            if calls_done && lag_done {
                return Ok(h);
            }
            if Instant::now() > deadline {
                bail!("node not idle after {within:?}: {h}");
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
