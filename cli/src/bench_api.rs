//! `espalier bench api`: a bounded load test of the daemon on loopback. It starts `espalier
//! serve` in a temporary state folder, queues pruning runs, and for a fixed time lets many
//! concurrent clients poll run status, list plugins and follow run events while a plugin file is
//! replaced in the watched folder every second. It reports requests served, unexpected
//! failures, read latency percentiles, the daemon's peak RSS, and whether each run's result
//! equals the same pipeline run by the CLI.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// What to run.
pub struct Options {
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds of load.
    pub seconds: u64,
    /// Pipelines whose runs execute during the load (each also run by the CLI to compare).
    pub pipelines: Vec<PathBuf>,
    /// Model every pipeline runs on (replaces `model`).
    pub model: String,
    /// Folder holding `fetch:` models already downloaded (linked into the daemon's state).
    pub models_dir: PathBuf,
}

/// The measured figures.
#[derive(Debug, serde::Serialize)]
pub struct ApiBench {
    /// Clients.
    pub clients: usize,
    /// Load duration, seconds.
    pub seconds: f64,
    /// Requests completed (status polls, plugin lists, event streams opened).
    pub requests: u64,
    /// Requests that failed other than as expected (transport errors, 5xx, unexpected 4xx).
    pub unexpected_failures: u64,
    /// Read-endpoint latency (status polls and plugin lists), milliseconds.
    pub read_p50_ms: f64,
    /// 99th percentile of the same.
    pub read_p99_ms: f64,
    /// Largest single read latency, milliseconds.
    pub read_max_ms: f64,
    /// Server-sent events received.
    pub events_received: u64,
    /// Plugin files replaced in the watched folder during the load.
    pub plugin_replacements: u64,
    /// The daemon's peak resident memory (VmHWM), bytes.
    pub daemon_peak_rss_bytes: Option<u64>,
    /// Per run: pipeline, status, seconds, and whether the result equals the CLI's.
    pub runs: Vec<Value>,
}

/// A daemon child on a temporary state folder, stopped (SIGTERM, then SIGKILL) on drop.
pub(crate) struct DaemonChild {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub(crate) base: String,
}

impl DaemonChild {
    /// Starts `command` (an `espalier serve` with piped stdout) and reads the address it
    /// prints first.
    pub(crate) fn spawn(command: &mut Command) -> Result<Self> {
        let mut child = command.spawn().context("starting espalier serve")?;
        let stdout = child.stdout.take().context("daemon stdout")?;
        // Owned from here, so a failure below still stops the child.
        let mut daemon = DaemonChild {
            child,
            base: String::new(),
        };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .with_context(|| format!("the daemon did not print its address: {line:?}"))?
            .to_string();
        daemon.base = format!("http://{addr}");
        Ok(daemon)
    }
}

impl Drop for DaemonChild {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(timeout).build()
}

/// Sends a request: (status, body) whatever the status; `Err` only for transport failures.
fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> Result<(u16, String)> {
    let req = agent.request(method, url);
    let result = match body {
        Some(b) => req
            .set("Content-Type", "application/json")
            .send_string(&b.to_string()),
        None => req.call(),
    };
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(anyhow::anyhow!("{method} {url}: {e}")),
    };
    let status = response.status();
    Ok((status, response.into_string()?))
}

/// Hard-links (or copies) every file of `from` into `to`, so the daemon's model folder holds
/// the model without a second download.
pub(crate) fn link_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            link_tree(&src, &dst)?;
        } else if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} into the bench state", src.display()))?;
        }
    }
    Ok(())
}

/// The pipeline text as the daemon should run it: `model` replaced, no `[export]` (the daemon
/// writes reports into the run's own folder).
fn daemon_body(path: &Path, model: &str) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    table.insert("model".into(), toml::Value::String(model.into()));
    table.remove("export");
    Ok(toml::to_string(&table)?)
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What must be equal between the daemon's and the CLI's report of one pipeline: every layer's
/// kept count and the perplexities.
fn fingerprint(report: &Value) -> Value {
    let layers: Vec<Value> = report["layers"]
        .as_array()
        .map(|l| l.iter().map(|l| json!([l["name"], l["kept"]])).collect())
        .unwrap_or_default();
    json!({
        "layers": layers,
        "dense": report["evaluation"]["dense"]["perplexity"]["perplexity"],
        "pruned": report["evaluation"]["pruned"]["perplexity"]["perplexity"],
    })
}

/// Runs the benchmark; `progress` gets a line per phase.
pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<ApiBench> {
    if opts.clients == 0 || opts.clients > 1000 {
        bail!("--clients must be in 1..=1000");
    }
    if opts.seconds == 0 || opts.seconds > 600 {
        bail!("--seconds must be in 1..=600");
    }
    let exe = std::env::current_exe().context("locating the espalier binary")?;
    let state = tempfile::Builder::new()
        .prefix("espalier-bench-api-")
        .tempdir()?;
    // The model, fetched once by the CLI's own folder, linked into the daemon's.
    if let Some(name) = opts.model.strip_prefix("fetch:") {
        progress(&format!("making sure {} is downloaded", opts.model));
        espalier::fetch::resolve(&opts.model, &opts.models_dir, &mut |m| progress(m))?;
        link_tree(
            &opts.models_dir.join(name),
            &state.path().join("models").join(name),
        )?;
    }
    progress("starting the daemon");
    let daemon = DaemonChild::spawn(
        Command::new(&exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--concurrency"])
            .arg(opts.pipelines.len().max(1).to_string())
            .arg("--state")
            .arg(state.path())
            .env("ESPALIER_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )?;
    let pid = daemon.child.id();
    let http = agent(Duration::from_secs(30));

    // The runs, queued before the load starts.
    let mut run_ids = Vec::new();
    for p in &opts.pipelines {
        let body = daemon_body(p, &opts.model)?;
        let (status, text) = call(
            &http,
            "POST",
            &format!("{}/v1/runs", daemon.base),
            Some(json!({"body": body})),
        )?;
        if status != 201 {
            bail!("queuing {}: HTTP {status}: {text}", p.display());
        }
        let v: Value = serde_json::from_str(&text)?;
        run_ids.push((p.clone(), v["id"].as_i64().context("run id")?));
    }

    // A plugin file replaced every second: the built-in magnitude with a changing custom
    // section (another sha256, the same behaviour), shadowing the built-in.
    let (s, _) = call(
        &http,
        "GET",
        &format!("{}/v1/plugins/magnitude", daemon.base),
        None,
    )?;
    if s != 200 {
        bail!("the daemon does not list the built-in magnitude plugin");
    }
    let magnitude = http
        .get(&format!("{}/v1/plugins/magnitude/wasm", daemon.base))
        .call()?;
    let mut base_wasm = Vec::new();
    magnitude.into_reader().read_to_end(&mut base_wasm)?;

    progress(&format!(
        "{} clients for {} s while {} run(s) execute",
        opts.clients,
        opts.seconds,
        run_ids.len()
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let events = Arc::new(AtomicU64::new(0));
    let replacements = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let failure_examples = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(opts.seconds);
    let mut threads = Vec::new();
    {
        let (stop, replacements) = (stop.clone(), replacements.clone());
        let folder = state.path().join("plugins");
        threads.push(std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let mut bytes = base_wasm.clone();
                let payload = format!("bench-{n}");
                bytes.push(0);
                bytes.push((payload.len() + 1 + 5) as u8);
                bytes.push(5);
                bytes.extend_from_slice(b"bench");
                bytes.extend_from_slice(payload.as_bytes());
                let tmp = folder.join(".bench-magnitude.tmp");
                if std::fs::write(&tmp, &bytes).is_ok()
                    && std::fs::rename(&tmp, folder.join("bench-magnitude.wasm")).is_ok()
                {
                    replacements.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
        }));
    }
    let ids: Vec<i64> = run_ids.iter().map(|(_, id)| *id).collect();
    for c in 0..opts.clients {
        let base = daemon.base.clone();
        let ids = ids.clone();
        let (stop, requests, failures, events, latencies, examples) = (
            stop.clone(),
            requests.clone(),
            failures.clone(),
            events.clone(),
            latencies.clone(),
            failure_examples.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let http = agent(Duration::from_secs(30));
            let mut mine = Vec::new();
            let fail = |what: String| {
                failures.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut e) = examples.lock()
                    && e.len() < 5
                {
                    e.push(what);
                }
            };
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let id = ids[(c + i) % ids.len().max(1)];
                i += 1;
                match c % 3 {
                    // Follow a run's events until it ends or the load does.
                    2 => {
                        let url = format!("{base}/v1/runs/{id}/events");
                        match http.get(&url).call() {
                            Ok(r) => {
                                requests.fetch_add(1, Ordering::Relaxed);
                                for line in BufReader::new(r.into_reader()).lines() {
                                    match line {
                                        Ok(l) if l.starts_with("data: ") => {
                                            events.fetch_add(1, Ordering::Relaxed);
                                        }
                                        Ok(_) => {}
                                        Err(_) => break,
                                    }
                                    if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                                        break;
                                    }
                                }
                            }
                            Err(e) => fail(format!("GET {url}: {e}")),
                        }
                        // A finished run's stream ends at once: do not spin on it.
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    k => {
                        let url = if k == 0 {
                            format!("{base}/v1/runs/{id}")
                        } else {
                            format!("{base}/v1/plugins")
                        };
                        let t = Instant::now();
                        match call(&http, "GET", &url, None) {
                            Ok((200, _)) => {
                                mine.push(t.elapsed().as_secs_f64() * 1e3);
                                requests.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok((s, body)) => fail(format!("GET {url}: HTTP {s}: {body:.200}")),
                            Err(e) => fail(e.to_string()),
                        }
                    }
                }
            }
            if let Ok(mut l) = latencies.lock() {
                l.extend(mine);
            }
        }));
    }
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let load_seconds = started.elapsed().as_secs_f64();
    let mut lat = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    lat.sort_by(f64::total_cmp);
    if let Ok(e) = failure_examples.lock() {
        for e in e.iter() {
            progress(&format!("unexpected failure: {e}"));
        }
    }

    progress("waiting for the runs to finish");
    let mut runs = Vec::new();
    for (path, id) in &run_ids {
        let run_deadline = Instant::now() + Duration::from_secs(3600);
        let record = loop {
            let (_, text) = call(&http, "GET", &format!("{}/v1/runs/{id}", daemon.base), None)?;
            let v: Value = serde_json::from_str(&text)?;
            if matches!(
                v["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled" | "interrupted")
            ) {
                break v;
            }
            if Instant::now() > run_deadline {
                bail!("run {id} did not finish within an hour");
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let (_, report) = call(
            &http,
            "GET",
            &format!("{}/v1/runs/{id}/report", daemon.base),
            None,
        )?;
        let daemon_report: Value = serde_json::from_str(&report).unwrap_or(Value::Null);
        progress(&format!(
            "running {} with the CLI to compare",
            path.display()
        ));
        let cli = Command::new(&exe)
            .args(["run", "--no-export", "--json", "--model", &opts.model])
            .arg(path)
            .env("ESPALIER_MODELS", &opts.models_dir)
            .stderr(Stdio::null())
            .output()
            .context("running the CLI")?;
        let cli_report: Value = serde_json::from_slice(&cli.stdout).unwrap_or(Value::Null);
        runs.push(json!({
            "pipeline": path.display().to_string(),
            "id": id,
            "status": record["status"],
            "seconds": record["metrics"]["seconds"],
            "perplexity_pruned": record["metrics"]["perplexity_pruned"],
            "plugins": record["plugins"],
            "equals_cli": record["status"] == "succeeded" && cli.status.success()
                && fingerprint(&daemon_report) == fingerprint(&cli_report),
        }));
    }
    let peak = peak_rss(pid);
    drop(daemon);
    Ok(ApiBench {
        clients: opts.clients,
        seconds: load_seconds,
        requests: requests.load(Ordering::Relaxed),
        unexpected_failures: failures.load(Ordering::Relaxed),
        read_p50_ms: percentile(&lat, 0.50),
        read_p99_ms: percentile(&lat, 0.99),
        read_max_ms: lat.last().copied().unwrap_or(0.0),
        events_received: events.load(Ordering::Relaxed),
        plugin_replacements: replacements.load(Ordering::Relaxed),
        daemon_peak_rss_bytes: peak,
        runs,
    })
}
