//! The portal's page in a real browser: Chromium, driven by playwright-core
//! (tests/portal_browser.mjs), creates an account with a passkey from its own WebAuthn stack (a
//! CDP virtual authenticator), signs out and in, is refused a passkey it already has and adds one
//! from a second authenticator, against a real `edgecoder portal`.
//!
//! Needs Node.js, Debian's `chromium` (/usr/bin/chromium, or `CHROMIUM`) and the playwright-core
//! package in target/js-sdk (or `PORTAL_BROWSER_JS_DIR`); .ci/run installs both. Set
//! `SCREENSHOT=/path.png` for a screenshot of the final page.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgecoder::standalone::ServiceInfo;

const BIN: &str = env!("CARGO_BIN_EXE_edgecoder");
/// How long the whole browser run may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(180);

/// A running `edgecoder portal`, killed when dropped.
struct Portal {
    child: Child,
    port: u16,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Portal {
    /// Starts a portal on a free port with `rp_id = localhost`; tries again (a fresh port) should
    /// another process take the port between our look and its bind.
    fn start() -> Portal {
        let mut last_log = String::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let log = dir.path().join("portal.log");
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new(BIN)
                .arg("portal")
                .arg("--data-dir")
                .arg(dir.path())
                .args(["--host", "127.0.0.1", "--set"])
                .arg(format!("portal.port={port}"))
                .args(["--set", "portal.rp_id=localhost", "--set"])
                .arg(format!("portal.origins=[\"http://localhost:{port}\"]"))
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap();
            let mut portal = Portal {
                child,
                port,
                log,
                dir,
            };
            if portal.wait_ready() {
                return portal;
            }
            last_log = portal.log();
        }
        panic!("the portal did not start (three tries); its last log:\n{last_log}");
    }

    /// Waits until portal.json names our process; false when the process exits first.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if ServiceInfo::read(&edgecoder::portal::info_file(self.dir.path()))
                .is_ok_and(|i| i.pid == self.child.id())
            {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "the portal did not write portal.json in 30s; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Portal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Node.js runs, Chromium is there and playwright-core is installed in `js_dir`; otherwise the
/// test fails saying how to install them.
fn check_tools(js_dir: &Path, chromium: &Path) {
    let node_ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let mut missing = Vec::new();
    if !node_ok {
        missing.push("Node.js: `apt-get install nodejs npm`".to_string());
    }
    if !chromium.is_file() {
        missing.push(format!(
            "Chromium at {}: `apt-get install --no-install-recommends chromium` (or set CHROMIUM)",
            chromium.display()
        ));
    }
    if !js_dir.join("node_modules/playwright-core").is_dir() {
        missing.push(format!(
            "the playwright-core package in {0}: `npm install --prefix {0} playwright-core@1`",
            js_dir.display()
        ));
    }
    assert!(
        missing.is_empty(),
        "this test drives a real browser and needs:\n  {}\n(.ci/run installs them)",
        missing.join("\n  ")
    );
}

#[test]
fn the_portal_page_creates_an_account_and_signs_in_with_passkeys_in_chromium() {
    let js_dir = PathBuf::from(
        std::env::var("PORTAL_BROWSER_JS_DIR")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/js-sdk").to_string()),
    );
    let chromium =
        PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    check_tools(&js_dir, &chromium);

    let portal = Portal::start();
    let base = format!("http://localhost:{}", portal.port);
    let out_dir = tempfile::tempdir().unwrap();
    let (stdout_path, stderr_path) = (out_dir.path().join("stdout"), out_dir.path().join("stderr"));
    let mut node = Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/portal_browser.mjs"
        ))
        .arg(&base)
        .current_dir(&js_dir)
        .env("NODE_PATH", js_dir.join("node_modules"))
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status = loop {
        if let Some(s) = node.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            // Chromium (on Playwright's --remote-debugging-pipe) exits when node's end closes.
            let _ = node.kill();
            let _ = node.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let report = format!(
        "--- browser script stdout:\n{stdout}\n--- stderr:\n{stderr}\n--- portal log:\n{}",
        portal.log()
    );
    let Some(status) = status else {
        panic!("the browser script ran past {BROWSER_TIMEOUT:?}\n{report}");
    };
    assert!(
        status.success() && stdout.contains("all portal browser checks passed"),
        "the portal browser checks failed ({status})\n{report}"
    );
}
