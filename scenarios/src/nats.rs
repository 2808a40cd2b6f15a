//! A `nats-server -js` of the test's own, on a free loopback port with a temp store; killed on
//! drop (tests never depend on a server left running). The one helper for every test and bench
//! that needs NATS: storage's suite includes this file too (`#[path]`), as storage cannot depend
//! on the scenarios crate.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server -js`: its config file, log and JetStream store in one temp dir.
pub struct Nats {
    child: Child,
    port: u16,
    settings: String,
    dir: tempfile::TempDir,
}

impl Nats {
    /// A plain server on a free port with a fresh store.
    pub fn fresh() -> Nats {
        Nats::start(free_port(), tempfile::tempdir().expect("temp dir"))
    }

    /// A plain server on `port`, keeping its store (and log) in `dir` (see [`Nats::stop`]).
    pub fn start(port: u16, dir: tempfile::TempDir) -> Nats {
        Nats::launch(port, String::new(), dir)
    }

    /// A server on a free port with `settings` in its config file (TLS, authorization blocks).
    pub fn with_settings(settings: &str) -> Nats {
        Nats::launch(free_port(), settings.to_owned(), tempfile::tempdir().expect("temp dir"))
    }

    fn launch(port: u16, settings: String, dir: tempfile::TempDir) -> Nats {
        let conf = dir.path().join("nats.conf");
        std::fs::write(&conf, format!("listen: \"127.0.0.1:{port}\"\n{settings}\n")).expect("write nats.conf");
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.path().join("nats.log")).expect("nats.log");
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .arg("-js")
            .arg("-sd")
            .arg(dir.path().join("store"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("nats-server (bash .ci/run installs it)");
        let mut nats = Nats { child, port, settings, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = nats.child.try_wait() {
                panic!("nats-server exited ({st}); its log:\n{}", nats.logs());
            }
            assert!(Instant::now() < deadline, "nats-server did not listen on {port}; its log:\n{}", nats.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
        nats
    }

    /// `nats://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.url_with("nats")
    }

    /// `{scheme}://127.0.0.1:PORT` (`tls`, …).
    pub fn url_with(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the server wrote to its log.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// Kills the server (SIGKILL), keeping its store for [`Nats::restart`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port, settings and store.
    pub fn restart(&mut self) {
        self.kill();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        *self = Nats::launch(self.port, std::mem::take(&mut self.settings), dir);
    }

    /// Kills the server and hands back its port and store, to start it again later.
    pub fn stop(mut self) -> (u16, tempfile::TempDir) {
        self.kill();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        (self.port, dir)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port").local_addr().expect("local addr").port()
}
