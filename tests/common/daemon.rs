//! The `espalier serve` harness shared by the daemon tests (`serve.rs`, `dashboard.rs`): the
//! daemon binary on a random loopback port in a temporary state folder, driven over real HTTP
//! (ureq). Every wait is bounded; the daemon is stopped (SIGTERM, then SIGKILL) when a test
//! ends.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::binary::bin;

pub const TOKEN: &str = "test-token-0123456789";

/// A daemon child process and its address.
pub struct Daemon {
    pub child: Child,
    pub base: String,
}

impl Daemon {
    /// Starts `espalier serve` on `state` with a short debounce (and the token when `token`).
    pub fn start(state: &Path, token: bool) -> Daemon {
        Self::start_with(state, token, "")
    }

    /// As [`Daemon::start`], with more config lines.
    pub fn start_with(state: &Path, token: bool, extra: &str) -> Daemon {
        std::fs::create_dir_all(state).unwrap();
        let config = state.join("serve.toml");
        let mut text = format!("debounce_ms = 100\n{extra}");
        if token {
            text.push_str(&format!("token = \"{TOKEN}\"\n"));
        }
        std::fs::write(&config, text).unwrap();
        let mut child = bin()
            .args(["serve", "--listen", "127.0.0.1:0", "--state"])
            .arg(state)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start espalier serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the daemon prints its address");
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Daemon {
            child,
            base: format!("http://{addr}"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request; returns status and body whatever the status.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        token: Option<&str>,
    ) -> (u16, Vec<u8>) {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        let mut req = agent.request(method, &self.url(path));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let result = match body {
            Some((content_type, bytes)) => req.set("Content-Type", content_type).send_bytes(&bytes),
            None => req.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = response.status();
        let mut bytes = Vec::new();
        response.into_reader().read_to_end(&mut bytes).unwrap();
        (status, bytes)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let (s, b) = self.call("GET", path, None, None);
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    pub fn post_json(&self, path: &str, body: &Value, token: Option<&str>) -> (u16, Value) {
        let (s, b) = self.call(
            "POST",
            path,
            Some(("application/json", body.to_string().into_bytes())),
            token,
        );
        (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    /// Polls `GET path` until `done` accepts the body (at most `secs`).
    pub fn wait_for(
        &self,
        path: &str,
        secs: u64,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (_, v) = self.get(path);
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {v:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_run(&self, id: i64, secs: u64) -> Value {
        self.wait_for(&format!("/v1/runs/{id}"), secs, "the run to end", |v| {
            matches!(
                v["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled" | "interrupted")
            )
        })
    }

    pub fn plugin_sha(&self, name: &str) -> Option<String> {
        let (_, v) = self.get("/v1/plugins");
        v["plugins"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["sha256"].as_str().map(str::to_string))
    }

    /// Stops the daemon as a service manager would and waits (bounded) for it to exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid with SIGTERM.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the daemon did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
