//! The dashboard in a real browser: the daemon binary serves it on a loopback port, and Debian's
//! Chromium, driven headless through ChromeDriver (WebDriver), loads every view
//! as a person would. The test checks what the page shows against the REST API and the reports,
//! follows a live run as it advances and finishes, uploads a plugin and cancels a run through
//! the page, and saves a screenshot of each view under
//! `target/tmp/dashboard-screenshots/` (printed at the end) for a person to look at.
//!
//! Needs `chromium` and `chromedriver` on PATH (Debian: `apt-get install chromium
//! chromium-driver`; `.ci/run` installs them). Where they are absent the test says so and
//! passes, unless `ESPALIER_REQUIRE_BROWSER=1` (set by `.ci/run`), where it fails.

#[path = "common/binary.rs"]
mod binary;
#[path = "common/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use binary::wasm;
use daemon::{Daemon, TOKEN};
use serde_json::{Value, json};

/// A program on PATH, by any of `names`.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// Chromium and ChromeDriver, or why the test cannot run.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let chromium = on_path(&["chromium", "chromium-browser", "google-chrome"]).ok_or(
        "no chromium on PATH (Debian: apt-get install chromium chromium-driver)".to_string(),
    )?;
    let driver = on_path(&["chromedriver"])
        .ok_or("no chromedriver on PATH (Debian: apt-get install chromium-driver)".to_string())?;
    Ok((chromium, driver))
}

/// ChromeDriver on a free loopback port; killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(program: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let child = Command::new(program)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = format!("http://127.0.0.1:{port}/status");
        loop {
            let ready = ureq::get(&status)
                .timeout(Duration::from_secs(2))
                .call()
                .ok()
                .and_then(|r| serde_json::from_reader::<_, Value>(r.into_reader()).ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebDriver session (the W3C protocol: JSON over loopback HTTP). Seven commands are all this
/// test needs, so it speaks them with `ureq` rather than pulling in a WebDriver client crate
/// and its HTTP stack (which would add a third of a CI build for one test).
struct Page {
    session: String,
    driver: String,
    base: String,
    shots: PathBuf,
}

/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Page {
    fn new_session(driver: &Driver, capabilities: Value, base: &str, shots: PathBuf) -> Page {
        let driver = format!("http://127.0.0.1:{}", driver.port);
        let v = webdriver(
            "POST",
            &format!("{driver}/session"),
            Some(json!({"capabilities": {"alwaysMatch": capabilities}})),
        );
        Page {
            session: v["sessionId"].as_str().expect("a session id").to_string(),
            driver,
            base: base.to_string(),
            shots,
        }
    }

    fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        webdriver(
            method,
            &format!("{}/session/{}{path}", self.driver, self.session),
            body,
        )
    }

    fn open(&self, hash: &str, view: &str) {
        self.command(
            "POST",
            "/url",
            Some(json!({"url": format!("{}/{hash}", self.base)})),
        );
        self.wait(
            &format!("the {view} view"),
            &format!("return document.body.dataset.view === {view:?} ? true : null"),
            30,
        );
    }

    /// Runs `script` in the page and returns its value.
    fn js(&self, script: &str) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Runs `script` until it returns something other than null/false (at most `secs`).
    fn wait(&self, what: &str, script: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.js(script);
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            if Instant::now() > deadline {
                let shot = self.shot(&format!("timeout-{}", what.replace(' ', "-")));
                panic!(
                    "timed out waiting for {what} (screenshot {})",
                    shot.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn element(&self, css: &str) -> String {
        let v = self.command(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let id = self.element(css);
        self.command("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    /// Types `text` into an input (for a file input: selects the file at that path).
    fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.command(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        );
    }

    fn resize(&self, width: u32, height: u32) {
        self.command(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }

    fn shot(&self, name: &str) -> PathBuf {
        use base64::Engine as _;
        let path = self.shots.join(format!("{name}.png"));
        let v = self.command("GET", "/screenshot", None);
        if let Some(png) = v
            .as_str()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        {
            let _ = std::fs::write(&path, png);
        }
        path
    }
}

/// Ends the session, which stops its Chromium; stopping ChromeDriver alone would leave the
/// browser running when a check fails.
impl Drop for Page {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.driver, self.session))
            .timeout(Duration::from_secs(30))
            .call();
    }
}

/// One WebDriver call; its `value`, or a panic with the driver's error.
fn webdriver(method: &str, url: &str, body: Option<Value>) -> Value {
    let request = ureq::request(method, url).timeout(Duration::from_secs(60));
    let result = match body {
        Some(b) => request
            .set("Content-Type", "application/json")
            .send_string(&b.to_string()),
        None => request.call(),
    };
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("WebDriver {method} {url}: {e}"),
    };
    let status = response.status();
    let v: Value = serde_json::from_reader(response.into_reader()).unwrap_or(Value::Null);
    assert!(
        status < 300,
        "WebDriver {method} {url}: {status} {}",
        v["value"]
    );
    v["value"].clone()
}

const TINY: &str = "model = \"builtin:tiny-llama\"\n";
const EVALUATE: &str =
    "[evaluate]\nwindow = 64\nmax_tokens = 512\nlatency = { prompt_tokens = 16, new_tokens = 8 }\n";

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// Kept fraction per (block, role), from a report, as the heat map must show it.
fn heat_cells(report: &Value) -> std::collections::BTreeMap<(u64, String), f64> {
    let mut sums: std::collections::BTreeMap<(u64, String), (f64, f64)> = Default::default();
    for l in report["layers"].as_array().unwrap() {
        let Some(block) = l["block"].as_u64() else {
            continue;
        };
        let e = sums
            .entry((block, l["role"].as_str().unwrap().to_string()))
            .or_default();
        e.0 += l["kept"].as_f64().unwrap();
        e.1 += l["original_numel"].as_f64().unwrap();
    }
    sums.into_iter().map(|(k, (a, b))| (k, a / b)).collect()
}

#[test]
fn dashboard_shows_runs_plugins_and_pipelines_and_drives_the_api() {
    let (chromium, chromedriver) = match browser() {
        Ok(found) => found,
        Err(why) => {
            assert!(
                std::env::var("ESPALIER_REQUIRE_BROWSER").as_deref() != Ok("1"),
                "ESPALIER_REQUIRE_BROWSER=1 but {why}"
            );
            eprintln!("SKIPPED dashboard_shows_runs...: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let pipelines = state.join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    std::fs::create_dir_all(state.join("plugins")).unwrap();
    std::fs::copy(wasm("slow_magnitude"), state.join("plugins/slow.wasm")).unwrap();
    // Not a component: refused, and listed with why.
    std::fs::write(state.join("plugins/junk.wasm"), b"\0asm but not really").unwrap();
    write(
        &pipelines,
        "tiny.toml",
        &format!(
            "name = \"tiny\"\n{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[export]\ndir = \"out/tiny\"\n{EVALUATE}"
        ),
    );
    write(
        &pipelines,
        "budgets.toml",
        &format!(
            "name = \"budgets\"\n{TINY}[calibration]\nsamples = 2\nseq_len = 32\n[[stage]]\nname = \"budget\"\nplugin = \"sensitivity\"\ndensity = 0.3\n[[stage]]\nname = \"prune\"\nplugin = \"wanda\"\ndensity = \"budget\"\n[export]\ndir = \"out/budgets\"\n{EVALUATE}"
        ),
    );
    // Two stages: the first busy for a few seconds, so the page sees the run move.
    write(
        &pipelines,
        "crawl.toml",
        &format!(
            "name = \"crawl\"\n{TINY}[sandbox]\ntimeout_s = 600\n[[stage]]\nname = \"crawl\"\nplugin = \"slow-magnitude\"\ndensity = 0.6\nspin = 3000000000\n[[stage]]\nname = \"finish\"\nplugin = \"magnitude\"\ndensity = 0.5\n"
        ),
    );
    write(
        &pipelines,
        "forever.toml",
        &format!(
            "name = \"forever\"\n{TINY}[sandbox]\ntimeout_s = 600\n[[stage]]\nname = \"forever\"\nplugin = \"slow-magnitude\"\ndensity = 0.5\nspin = 4000000000000000000\n"
        ),
    );
    // An error on line 5: the page must mark that line.
    write(
        &pipelines,
        "broken.toml",
        &format!(
            "name = \"broken\"\n{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = \"most\"\n"
        ),
    );
    let d = Daemon::start(&state, true);

    // A finished run and one with budgets, before the page opens.
    let mut finished = Vec::new();
    for name in ["tiny", "budgets"] {
        let (s, run) = d.post_json("/v1/runs", &json!({"pipeline": name}), Some(TOKEN));
        assert_eq!(s, 201, "{run:#}");
        let id = run["id"].as_i64().unwrap();
        let record = d.wait_run(id, 120);
        assert_eq!(record["status"], "succeeded", "{record:#}");
        finished.push(id);
    }
    let (tiny, budgets) = (finished[0], finished[1]);

    let driver = Driver::start(&chromedriver);
    let profile = dir.path().join("chromium-profile");
    let capabilities = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ]
        }
    });
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let page = Page::new_session(&driver, capabilities, &d.base, shots);

    // ---- runs: the list follows the event stream without reloading ----
    page.open("#/runs", "runs");
    page.wait(
        "the event stream",
        "return document.getElementById('feed-state').textContent === 'live' ? true : null",
        30,
    );
    let shown = page.js(&format!(
        "return document.querySelector('tr[data-run=\"{tiny}\"]')?.dataset.status ?? null"
    ));
    assert_eq!(shown, "succeeded");
    let (s, run) = d.post_json("/v1/runs", &json!({"pipeline": "crawl"}), Some(TOKEN));
    assert_eq!(s, 201, "{run:#}");
    let crawl = run["id"].as_i64().unwrap();
    let row = format!("document.querySelector('tr[data-run=\"{crawl}\"]')");
    let stage = page
        .wait(
            "the live run's first stage in the list",
            &format!(
                "const r = {row}; return r && r.dataset.status === 'running' && r.querySelector('.stage').textContent.includes('crawl') ? r.querySelector('.stage').textContent : null"
            ),
            60,
        )
        ;
    assert!(stage.as_str().unwrap().contains("crawl"), "{stage}");
    page.shot("runs-live");
    page.wait(
        "the live run to finish in the list",
        &format!("const r = {row}; return r && r.dataset.status === 'succeeded' ? true : null"),
        120,
    );
    let progress = page.js(&format!("return {row}.querySelector('progress').value"));
    assert_eq!(progress.as_f64(), Some(1.0));
    assert_eq!(d.get(&format!("/v1/runs/{crawl}")).1["status"], "succeeded");
    // The status filter hides what does not match.
    page.js("const s = document.getElementById('filter-status'); s.value = 'running'; s.dispatchEvent(new Event('change')); return true")
        ;
    assert_eq!(
        page.js("return document.querySelectorAll('#runs tr[data-run]').length"),
        0
    );
    page.shot("runs");

    // ---- one run: heat map, evaluation, stages, layers, downloads ----
    page.open(&format!("#/runs/{tiny}"), &format!("runs/{tiny}"));
    let report = d.get(&format!("/v1/runs/{tiny}/report")).1;
    let expected = heat_cells(&report);
    let cells = page
        .js("return [...document.querySelectorAll('#heatmap rect.cell')].map(c => [Number(c.dataset.block), c.dataset.role, Number(c.dataset.value)])")
        ;
    let cells = cells.as_array().unwrap();
    let blocks: std::collections::BTreeSet<u64> = expected.keys().map(|k| k.0).collect();
    let roles: std::collections::BTreeSet<&str> = expected.keys().map(|k| k.1.as_str()).collect();
    assert_eq!(cells.len(), blocks.len() * roles.len(), "{cells:?}");
    for c in cells {
        let key = (c[0].as_u64().unwrap(), c[1].as_str().unwrap().to_string());
        let want = expected[&key];
        assert!(
            (c[2].as_f64().unwrap() - want).abs() < 1e-6,
            "cell {key:?}: page {} report {want}",
            c[2]
        );
    }
    let ppl = report["evaluation"]["pruned"]["perplexity"]["perplexity"]
        .as_f64()
        .unwrap();
    let table = page.js("return document.getElementById('evaluation').innerText");
    assert!(
        table.as_str().unwrap().contains(&format!("{ppl:.3}")),
        "{table}"
    );
    // Sorting the layer table by density puts the lowest first.
    page.click("#layers th[data-sort='density']");
    let first =
        page.js("return document.querySelector('#layers tbody tr td:nth-child(6)').textContent");
    let lowest = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["density"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(first, format!("{:.1}%", lowest * 100.0));
    let links = page
        .js("return [document.getElementById('download-report').href, document.getElementById('download-masks').href]")
        ;
    for link in links.as_array().unwrap() {
        let path = link.as_str().unwrap().trim_start_matches(&d.base);
        let (status, body) = d.call("GET", path, None, None);
        assert_eq!(status, 200, "{path}");
        assert!(!body.is_empty(), "{path}");
    }
    let hashes = page.js("return document.getElementById('plugins-used').innerText");
    assert!(
        hashes
            .as_str()
            .unwrap()
            .contains(report["stages"][0]["plugin_sha256"].as_str().unwrap()),
        "{hashes}"
    );
    page.shot("run");

    // Budgets of a sensitivity stage as a bar chart, one bar per layer.
    page.open(&format!("#/runs/{budgets}"), &format!("runs/{budgets}"));
    let report = d.get(&format!("/v1/runs/{budgets}/report")).1;
    let budget_count = report["stages"][0]["budgets"].as_object().unwrap().len();
    assert!(budget_count > 0);
    assert_eq!(
        page.js("return document.querySelectorAll('#budgets-budget rect.bar').length"),
        budget_count
    );
    page.shot("run-budgets");

    // ---- compare: one point per selected run ----
    page.open(&format!("#/compare?ids={tiny},{budgets}"), "compare");
    for chart in ["ppl-vs-density", "ms-vs-density"] {
        let points = page
            .js(&format!(
                "return [...document.querySelectorAll('#{chart} circle.point')].map(c => Number(c.dataset.run))"
            ))
            ;
        let mut points: Vec<i64> = points
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        points.sort();
        assert_eq!(points, vec![tiny, budgets], "{chart}");
    }
    page.shot("compare");

    // ---- plugins: upload through the page (the token is asked once) ----
    page.open("#/plugins", "plugins");
    assert!(
        page.js("return !!document.querySelector('tr[data-plugin=\"slow-magnitude\"]')") == true
    );
    let upload = dir.path().join("legacy.wasm");
    std::fs::copy(wasm("legacy_v03"), &upload).unwrap();
    page.type_into("#upload-file", upload.to_str().unwrap());
    page.wait(
        "the token dialog",
        "return document.getElementById('token-dialog').open ? true : null",
        30,
    );
    page.type_into("#token-input", TOKEN);
    page.click("#token-save");
    page.wait(
        "the uploaded plugin in the list",
        "return document.querySelector('tr[data-plugin=\"legacy-v03\"]') ? true : null",
        30,
    );
    let listed = d.get("/v1/plugins").1;
    assert!(
        listed["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "legacy-v03" && p["source"] == "upload"),
        "{listed:#}"
    );
    let rejected = page.js("return document.getElementById('rejected').innerText");
    assert!(
        rejected.as_str().unwrap().contains("junk.wasm"),
        "{rejected}"
    );
    // Dropping a file on the page uploads it too: the built-in magnitude's own bytes, read
    // through the API, dropped as a file, land in the plugin folder (shadowing the built-in).
    page.js(
        "fetch('/v1/plugins/magnitude/wasm').then(r => r.arrayBuffer()).then(bytes => {
           const dt = new DataTransfer();
           dt.items.add(new File([bytes], 'magnitude.wasm', {type: 'application/wasm'}));
           document.getElementById('dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
         }); return true",
    );
    page.wait(
        "the dropped plugin in the list",
        "const r = document.querySelector('tr[data-plugin=\"magnitude\"]'); return r && r.innerText.includes('upload') ? true : null",
        30,
    );
    assert!(state.join("plugins/magnitude.wasm").is_file());
    page.shot("plugins");

    // ---- pipelines: an error shown at its line; a run started with overrides ----
    page.open("#/pipelines", "pipelines");
    page.shot("pipelines");
    page.open("#/pipelines/broken", "pipelines/broken");
    let marked = page.js("return document.getElementById('error-line')?.dataset.line ?? null");
    assert_eq!(marked, "5");
    assert!(page.js("return document.getElementById('start-run').disabled") == true);
    page.shot("pipeline-error");
    page.open("#/pipelines/forever", "pipelines/forever");
    page.type_into("#override-density", "0.25");
    page.click("#start-run");
    let started = page
        .wait(
            "the new run's page",
            "const m = location.hash.match(/^#\\/runs\\/(\\d+)$/); return m && document.body.dataset.view === 'runs/' + m[1] ? Number(m[1]) : null",
            30,
        )
        .as_i64()
        .unwrap();
    let record = d.get(&format!("/v1/runs/{started}")).1;
    assert_eq!(record["pipeline_name"], "forever");
    assert_eq!(record["overrides"]["density"], 0.25);

    // ---- cancel from the run's page ----
    page.wait(
        "the run to be running",
        "return document.getElementById('run-status').textContent === 'running' ? true : null",
        60,
    );
    page.shot("run-live");
    page.click("#cancel");
    page.click("#cancel-confirm");
    let record = d.wait_run(started, 60);
    assert_eq!(record["status"], "cancelled", "{record:#}");
    page.wait(
        "the page to show the cancellation",
        "return document.getElementById('run-status')?.textContent === 'cancelled' ? true : null",
        30,
    );
    page.shot("run-cancelled");

    // ---- a laptop width: nothing wider than the window ----
    page.resize(1024, 768);
    page.open("#/runs", "runs");
    let overflow = page.js("return document.documentElement.scrollWidth - window.innerWidth");
    assert!(overflow.as_i64().unwrap() <= 0, "overflow {overflow} px");
    page.shot("runs-1024");

    eprintln!("dashboard screenshots: {}", page.shots.display());
    drop(page);
    drop(driver);
    let status = d.stop();
    assert!(status.success(), "{status:?}");
}
