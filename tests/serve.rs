//! `espalier serve` end to end: each test starts the daemon binary on a random loopback port in
//! a temporary state folder and drives it over real HTTP (ureq), as a CI job or a notebook
//! would. Every wait is bounded; the daemon is stopped (SIGTERM, then SIGKILL) when a test ends.

#[path = "common/binary.rs"]
mod binary;
#[path = "common/daemon.rs"]
mod daemon;

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use binary::{bin, wasm};
use daemon::{Daemon, TOKEN};
use serde_json::{Value, json};

/// `bytes` with a custom section appended: another component (another sha256) that behaves
/// the same, like a rebuilt plugin.
fn with_custom_section(bytes: &[u8], payload: &[u8]) -> Vec<u8> {
    let name = b"espalier-test";
    let mut content = vec![name.len() as u8];
    content.extend_from_slice(name);
    content.extend_from_slice(payload);
    let mut out = bytes.to_vec();
    out.push(0); // custom section id
    let mut len = content.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(&content);
    out
}

/// Sends `head` (request line and headers) and `body_bytes` zeros on a plain socket, then reads
/// the response.
fn raw_request(d: &Daemon, head: &str, body_bytes: usize) -> String {
    use std::io::Write;
    let addr = d.base.trim_start_matches("http://");
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    socket.write_all(head.as_bytes()).unwrap();
    socket.write_all(&vec![0u8; body_bytes]).unwrap();
    let mut out = Vec::new();
    let _ = socket.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn sha256(bytes: &[u8]) -> String {
    espalier::plugin::runtime::sha256_hex(bytes)
}

const TINY: &str = "model = \"builtin:tiny-llama\"\n";

fn slow_pipeline(spin: u64) -> String {
    format!(
        "name = \"slow\"\n{TINY}[sandbox]\ntimeout_s = 600\n[[stage]]\nplugin = \"slow-magnitude\"\ndensity = 0.5\nspin = {spin}\n"
    )
}

/// Reads a server-sent event stream to its end: (id, event type, data) in order.
fn follow(d: &Daemon, id: i64, last_event_id: Option<u64>) -> Vec<(u64, String, Value)> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let mut req = agent.get(&d.url(&format!("/v1/runs/{id}/events")));
    if let Some(l) = last_event_id {
        req = req.set("Last-Event-ID", &l.to_string());
    }
    let response = req.call().expect("events stream");
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let mut events = Vec::new();
    let (mut seq, mut kind) = (0u64, String::new());
    for line in BufReader::new(response.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(v) = line.strip_prefix("id: ") {
            seq = v.parse().unwrap();
        } else if let Some(v) = line.strip_prefix("event: ") {
            kind = v.to_string();
        } else if let Some(v) = line.strip_prefix("data: ") {
            events.push((seq, kind.clone(), serde_json::from_str(v).unwrap()));
        }
    }
    events
}

#[test]
fn named_and_inline_runs_stream_their_events_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("pipelines")).unwrap();
    std::fs::write(
        state.join("pipelines/tiny.toml"),
        format!("{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[evaluate]\ntext = \"data/eval.txt\"\nwindow = 32\nmax_tokens = 256\n"),
    )
    .unwrap();
    std::fs::write(
        state.join("pipelines/broken.toml"),
        "model = \"builtin:tiny-llama\"\n[[stage]]\ndensity = 2\n",
    )
    .unwrap();
    std::fs::write(state.join("pipelines/outside.toml"), "model = \"/etc\"\n").unwrap();
    std::fs::create_dir_all(state.join("plugins")).unwrap();
    std::fs::copy(wasm("slow_magnitude"), state.join("plugins/slow.wasm")).unwrap();
    let d = Daemon::start(&state, false);

    // Health, OpenAPI, the listed pipelines (a broken one with its position).
    assert_eq!(d.get("/healthz").0, 200);
    let (s, doc) = d.get("/openapi.json");
    assert_eq!(s, 200);
    assert!(doc["paths"]["/v1/runs/{id}/events"].is_object(), "{doc:#}");
    let (_, pipelines) = d.get("/v1/pipelines");
    let by_name = |n: &str| {
        pipelines
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == n)
            .cloned()
            .unwrap()
    };
    assert!(by_name("tiny")["error"].is_null(), "{pipelines:#}");
    let broken = by_name("broken")["error"].as_str().unwrap().to_string();
    assert!(
        broken.contains("broken.toml:2:1: stage[0].plugin"),
        "{broken}"
    );
    assert!(
        by_name("outside")["error"]
            .as_str()
            .unwrap()
            .contains("outside.toml:1:9: model"),
        "{pipelines:#}"
    );

    // A named run, followed to its end.
    let (s, run) = d.post_json("/v1/runs", &json!({"pipeline": "tiny"}), None);
    assert_eq!(s, 201, "{run:#}");
    let named = run["id"].as_i64().unwrap();
    let events = follow(&d, named, None);
    let kinds: Vec<&str> = events.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"run-started"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"run-finished"), "{kinds:?}");
    for k in [
        "stage-started",
        "stage-finished",
        "evaluation-progress",
        "evaluation-finished",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let seqs: Vec<u64> = events.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    // Resuming after event 3 gives exactly the rest.
    let resumed = follow(&d, named, Some(3));
    assert_eq!(resumed.len(), events.len() - 3);
    assert_eq!(resumed[0].0, 4);
    let record = d.wait_run(named, 60);
    assert_eq!(record["status"], "succeeded", "{record:#}");
    assert_eq!(record["progress"], 1.0);
    assert!(
        record["metrics"]["perplexity_pruned"].as_f64().unwrap() > 1.0,
        "{record:#}"
    );
    assert!(record["plugins"]["magnitude"].as_str().unwrap().len() == 64);
    let (s, report) = d.get(&format!("/v1/runs/{named}/report"));
    assert_eq!(s, 200);
    assert_eq!(report["pipeline"], "tiny");

    // An inline run with a density override.
    let body = format!("{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n");
    let (s, run) = d.post_json(
        "/v1/runs",
        &json!({"body": body, "overrides": {"density": 0.25}}),
        None,
    );
    assert_eq!(s, 201, "{run:#}");
    let inline = run["id"].as_i64().unwrap();
    let events = follow(&d, inline, None);
    assert_eq!(events.last().unwrap().1, "run-finished");
    // The plugin's own progress reports (WIT 0.4 `progress`) reach the stream with counts.
    assert!(
        events.iter().any(|(_, k, v)| k == "stage-progress"
            && v["total"].as_u64().is_some_and(|t| t > 0)
            && v["done"].as_u64().is_some()),
        "{events:?}"
    );
    let record = d.wait_run(inline, 60);
    let density = record["metrics"]["block_linear_density"].as_f64().unwrap();
    assert!((density - 0.25).abs() < 0.01, "{record:#}");

    // Listing with filters.
    let (_, runs) = d.get("/v1/runs?pipeline=tiny");
    assert_eq!(runs.as_array().unwrap().len(), 1);
    let (s, _) = d.get("/v1/runs?status=sideways");
    assert_eq!(s, 400);

    // A run that will not finish, then the daemon is killed under it.
    let (s, run) = d.post_json(
        "/v1/runs",
        &json!({"body": slow_pipeline(u64::MAX / 2)}),
        None,
    );
    assert_eq!(s, 201, "{run:#}");
    let killed = run["id"].as_i64().unwrap();
    d.wait_for(
        &format!("/v1/runs/{killed}"),
        60,
        "the slow run to start",
        |v| v["status"] == "running",
    );
    let mut d = d;
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    drop(d);

    let d = Daemon::start(&state, false);
    let (_, all) = d.get("/v1/runs");
    let ids: Vec<i64> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![killed, inline, named], "newest first: {all:#}");
    let record = d.get(&format!("/v1/runs/{killed}")).1;
    assert_eq!(record["status"], "interrupted", "{record:#}");
    assert!(
        record["error"]["message"]
            .as_str()
            .unwrap()
            .contains("daemon stopped"),
        "{record:#}"
    );
    assert_eq!(d.get(&format!("/v1/runs/{named}")).1["status"], "succeeded");
    // The stream of an interrupted run ends instead of hanging.
    let events = follow(&d, killed, None);
    assert_eq!(
        events.last().map(|e| e.1.as_str()),
        Some("run-interrupted"),
        "{events:?}"
    );
    let status = d.stop();
    assert!(status.success(), "{status:?}");
}

#[test]
fn watched_plugins_hot_reload_and_runs_keep_their_version() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = Daemon::start(&state, false);
    let v1 = std::fs::read(wasm("slow_magnitude")).unwrap();
    let v2 = with_custom_section(&v1, b"v2");
    let target = state.join("plugins/slow.wasm");

    // Dropped in: listed once complete.
    std::fs::write(state.join("plugins/.slow.wasm.part"), &v1).unwrap();
    std::fs::rename(state.join("plugins/.slow.wasm.part"), &target).unwrap();
    d.wait_for("/v1/plugins", 30, "the dropped plugin", |v| {
        v["plugins"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["name"] == "slow-magnitude" && p["sha256"] == sha256(&v1))
        })
    });

    // A run in flight keeps v1 while the file is replaced by v2; the next run gets v2.
    let (s, run) = d.post_json(
        "/v1/runs",
        &json!({"body": slow_pipeline(2_000_000_000)}),
        None,
    );
    assert_eq!(s, 201, "{run:#}");
    let first = run["id"].as_i64().unwrap();
    d.wait_for(
        &format!("/v1/runs/{first}"),
        60,
        "the first run to reach its stage",
        |v| v["status"] == "running" && v["plugins"]["slow-magnitude"].is_string(),
    );
    std::fs::write(state.join("plugins/.slow.tmp"), &v2).unwrap();
    std::fs::rename(state.join("plugins/.slow.tmp"), &target).unwrap();
    d.wait_for("/v1/plugins", 30, "v2 to replace v1", |_| {
        d.plugin_sha("slow-magnitude") == Some(sha256(&v2))
    });
    let (_, run) = d.post_json("/v1/runs", &json!({"body": slow_pipeline(1000)}), None);
    let second = run["id"].as_i64().unwrap();
    let first_record = d.wait_run(first, 120);
    let second_record = d.wait_run(second, 120);
    assert_eq!(first_record["status"], "succeeded", "{first_record:#}");
    assert_eq!(
        first_record["plugins"]["slow-magnitude"],
        sha256(&v1),
        "{first_record:#}"
    );
    assert_eq!(
        second_record["plugins"]["slow-magnitude"],
        sha256(&v2),
        "{second_record:#}"
    );

    // A truncated file is reported and ignored; v2 stays.
    std::fs::write(&target, &v1[..v1.len() / 3]).unwrap();
    let listed = d.wait_for(
        "/v1/plugins",
        30,
        "the truncated file to be reported",
        |v| {
            v["rejected"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|r| r["file"].as_str().is_some_and(|f| f.ends_with("slow.wasm")))
            })
        },
    );
    assert_eq!(
        d.plugin_sha("slow-magnitude"),
        Some(sha256(&v2)),
        "{listed:#}"
    );
    let (_, metrics) = d.call("GET", "/metrics", None, None);
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("plugin_load_failures"), "{metrics}");

    // Removed: gone for new runs. A built-in is always there.
    std::fs::remove_file(&target).unwrap();
    d.wait_for("/v1/plugins", 30, "the removed plugin to go", |_| {
        d.plugin_sha("slow-magnitude").is_none()
    });
    assert!(d.plugin_sha("magnitude").is_some());

    // Upload, then download: same bytes, same hash; the file lands in the folder.
    let (s, body) = d.call(
        "POST",
        "/v1/plugins",
        Some(("application/wasm", v1.clone())),
        None,
    );
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&body));
    let uploaded: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(uploaded["sha256"], sha256(&v1));
    assert_eq!(uploaded["source"], "upload");
    assert_eq!(
        std::fs::read(state.join("plugins/slow-magnitude.wasm")).unwrap(),
        v1
    );
    let (s, downloaded) = d.call("GET", "/v1/plugins/slow-magnitude/wasm", None, None);
    assert_eq!(s, 200);
    assert_eq!(sha256(&downloaded), sha256(&v1));
    assert_eq!(downloaded, v1);
    let (s, by_sha) = d.call(
        "GET",
        &format!("/v1/plugins/{}/wasm", sha256(&v1)),
        None,
        None,
    );
    assert_eq!((s, by_sha == v1), (200, true));
    // A different plugin of the same name needs ?replace=true.
    let (s, _) = d.call(
        "POST",
        "/v1/plugins",
        Some(("application/wasm", v2.clone())),
        None,
    );
    assert_eq!(s, 409);
    let (s, _) = d.call(
        "POST",
        "/v1/plugins?replace=true",
        Some(("application/wasm", v2.clone())),
        None,
    );
    assert_eq!(s, 201);
    // Built-ins can be downloaded, not deleted.
    let (s, b) = d.call("GET", "/v1/plugins/magnitude/wasm", None, None);
    assert_eq!((s, &b[..4]), (200, &b"\0asm"[..]));
    assert_eq!(d.call("DELETE", "/v1/plugins/magnitude", None, None).0, 409);
    assert_eq!(
        d.call("DELETE", "/v1/plugins/slow-magnitude", None, None).0,
        204
    );
    assert!(!state.join("plugins/slow-magnitude.wasm").exists());
}

#[test]
fn cancel_stops_a_run_inside_a_plugin_and_tokens_guard_changes() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("plugins")).unwrap();
    std::fs::copy(wasm("hostile_loop"), state.join("plugins/loop.wasm")).unwrap();
    let d = Daemon::start(&state, true);
    let looping = format!(
        "{TINY}[sandbox]\ntimeout_s = 600\n[[stage]]\nplugin = \"hostile-loop\"\ndensity = 0.5\n"
    );

    // Without or with a wrong token, nothing changes; reads stay open.
    for token in [None, Some("wrong-token-xxxxxxxx")] {
        let (s, e) = d.post_json("/v1/runs", &json!({"body": looping}), token);
        assert_eq!(s, 401, "{e:#}");
        assert_eq!(e["error"]["kind"], "unauthorized");
        assert_eq!(
            d.call(
                "POST",
                "/v1/plugins",
                Some(("application/wasm", vec![0; 8])),
                token
            )
            .0,
            401
        );
        assert_eq!(
            d.call("DELETE", "/v1/plugins/hostile-loop", None, token).0,
            401
        );
    }
    assert_eq!(d.get("/v1/plugins").0, 200);

    let (s, run) = d.post_json("/v1/runs", &json!({"body": looping}), Some(TOKEN));
    assert_eq!(s, 201, "{run:#}");
    let id = run["id"].as_i64().unwrap();
    d.wait_for(
        &format!("/v1/runs/{id}"),
        60,
        "the looping plugin to be called",
        |v| v["status"] == "running" && v["current_stage"] == "hostile-loop",
    );
    let asked = Instant::now();
    assert_eq!(
        d.call("DELETE", &format!("/v1/runs/{id}"), None, None).0,
        401
    );
    let (s, _) = d.call("DELETE", &format!("/v1/runs/{id}"), None, Some(TOKEN));
    assert_eq!(s, 202);
    let record = d.wait_run(id, 30);
    assert_eq!(record["status"], "cancelled", "{record:#}");
    assert!(asked.elapsed() < Duration::from_secs(30));
    let events = follow(&d, id, None);
    assert_eq!(events.last().unwrap().1, "run-cancelled", "{events:?}");
    // Cancelling a finished run is a conflict; an unknown run is not found.
    let (s, e) = d.post_json(&format!("/v1/runs/{id}/cancel"), &json!({}), Some(TOKEN));
    assert_eq!(s, 409, "{e:#}");
    assert_eq!(
        d.call("DELETE", "/v1/runs/999999", None, Some(TOKEN)).0,
        404
    );
    assert_eq!(d.get("/v1/runs/999999").0, 404);
    assert_eq!(d.get("/v1/runs/abc").0, 400);
    let status = d.stop();
    assert!(status.success(), "{status:?}");
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = Daemon::start_with(&state, false, "max_upload_mb = 1\n");
    let before: Vec<_> = std::fs::read_dir(state.join("plugins")).unwrap().collect();

    // Routes and methods.
    let (s, e) = d.get("/v1/nothing-here");
    assert_eq!((s, e["error"]["kind"].as_str()), (404, Some("not-found")));
    assert_eq!(d.call("PUT", "/v1/runs", None, None).0, 405);

    // Malformed JSON and unknown fields.
    let (s, e) = d.call(
        "POST",
        "/v1/runs",
        Some(("application/json", b"{\"pipeline\": ".to_vec())),
        None,
    );
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&e));
    let (s, _) = d.post_json("/v1/runs", &json!({"pipeline": "x", "colour": "red"}), None);
    assert_eq!(s, 400);
    let (s, _) = d.post_json("/v1/runs", &json!({}), None);
    assert_eq!(s, 400);
    let (s, _) = d.post_json("/v1/runs", &json!({"pipeline": "no-such"}), None);
    assert_eq!(s, 404);

    // A malformed pipeline body names file, line and field.
    let body = format!("{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 1.5\n");
    let (s, e) = d.post_json("/v1/runs", &json!({"body": body}), None);
    assert_eq!(s, 400, "{e:#}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("request.toml:4:1: stage[0].density:"),
        "{message}"
    );
    let (s, b) = d.call(
        "POST",
        "/v1/pipelines/validate",
        Some(("application/toml", b"model = 3\n".to_vec())),
        None,
    );
    assert_eq!(s, 400);
    assert!(
        String::from_utf8_lossy(&b).contains("request.toml:1:9"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (s, v) = {
        let (s, b) = d.call(
            "POST",
            "/v1/pipelines/validate",
            Some(("application/toml", body.replace("1.5", "0.5").into_bytes())),
            None,
        );
        (s, serde_json::from_slice::<Value>(&b).unwrap())
    };
    assert_eq!((s, v["stages"][0].as_str()), (200, Some("magnitude")));

    // Paths outside the state folder.
    for (text, field) in [
        ("model = \"/etc\"\n".to_string(), "1:9: model"),
        ("model = \"models/../../x\"\n".to_string(), "1:9: model"),
        (
            format!(
                "{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[export]\ndir = \"/tmp/out\"\n"
            ),
            "6:7: export.dir",
        ),
        (
            format!("{TINY}[calibration]\ntext = \"/etc/passwd\"\n"),
            "3:8: calibration.text",
        ),
        (
            format!("{TINY}[[stage]]\nplugin = \"../evil.wasm\"\n"),
            "3:1: stage[0].plugin",
        ),
    ] {
        let (s, e) = d.post_json("/v1/runs", &json!({"body": text}), None);
        assert_eq!(s, 400, "{text}: {e:#}");
        let m = e["error"]["message"].as_str().unwrap();
        assert!(m.contains(&format!("request.toml:{field}")), "{m}");
    }
    let (s, e) = d.post_json(
        "/v1/runs",
        &json!({"pipeline": null, "body": TINY, "overrides": {"model": "/etc"}}),
        None,
    );
    assert_eq!(s, 400, "{e:#}");

    // Plugin names: traversal finds nothing; an upload that is not a component is refused.
    assert_eq!(d.get("/v1/plugins/..%2F..%2Fetc%2Fpasswd/wasm").0, 404);
    let (s, e) = d.call(
        "POST",
        "/v1/plugins",
        Some(("application/wasm", b"not wasm at all".to_vec())),
        None,
    );
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&e));
    assert!(String::from_utf8_lossy(&e).contains("not WebAssembly"));
    let module = b"\0asm\x01\0\0\0".to_vec();
    let (s, e) = d.call(
        "POST",
        "/v1/plugins",
        Some(("application/wasm", module)),
        None,
    );
    assert_eq!(s, 400, "{}", String::from_utf8_lossy(&e));
    // Oversized: 413, nothing written.
    // (The daemon stops reading at the limit and answers, so the request is sent by hand:
    // a client streaming all of a larger body would write into a closed socket.)
    let response = raw_request(
        &d,
        &format!(
            "POST /v1/plugins HTTP/1.1\r\nHost: x\r\nContent-Type: application/wasm\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            2 << 20
        ),
        (1 << 20) + (64 << 10),
    );
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("payload-too-large"), "{response}");
    let after: Vec<_> = std::fs::read_dir(state.join("plugins")).unwrap().collect();
    assert_eq!(before.len(), after.len());
    assert!(d.get("/v1/runs").1.as_array().unwrap().is_empty());
}

/// `GET /v1/events` carries every run's events (after a `run-queued` with the record), each with
/// the same sequence number and content as the run's own stream; `GET /v1/runs/ID/masks`
/// serves a run's exported masks until a later run exports to the same folder.
#[test]
fn the_daemon_wide_feed_and_masks_downloads() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = Daemon::start(&state, false);
    let pipeline = format!(
        "name = \"feed\"\n{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n[export]\ndir = \"out/feed\"\n"
    );

    // Subscribe first (the stream opens with `hello`), then queue a run.
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let response = agent.get(&d.url("/v1/events")).call().expect("feed");
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let mut lines = BufReader::new(response.into_reader()).lines();
    let mut next_event = move || -> (String, Value) {
        let mut kind = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(v) = line.strip_prefix("event: ") {
                kind = v.to_string();
            } else if let Some(v) = line.strip_prefix("data: ") {
                return (kind, serde_json::from_str(v).unwrap());
            }
        }
        panic!("the feed ended");
    };
    assert_eq!(next_event().0, "hello");
    let (s, run) = d.post_json("/v1/runs", &json!({"body": pipeline}), None);
    assert_eq!(s, 201, "{run:#}");
    let first = run["id"].as_i64().unwrap();
    let (kind, queued) = next_event();
    assert_eq!(kind, "run-queued");
    assert_eq!(queued["run"], first);
    assert_eq!(queued["event"]["status"], "queued");
    let mut fed = Vec::new();
    loop {
        let (kind, e) = next_event();
        assert_eq!(e["run"], first, "{e:#}");
        let end = kind == "run-finished";
        fed.push((e["seq"].as_u64().unwrap(), kind, e["event"].clone()));
        if end {
            break;
        }
    }
    assert_eq!(fed, follow(&d, first, None));

    // The masks of the export, as u8 safetensors; a later run to the same folder replaces them.
    let (status, masks) = d.call("GET", &format!("/v1/runs/{first}/masks"), None, None);
    assert_eq!(status, 200);
    let header_len = u64::from_le_bytes(masks[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&masks[8..8 + header_len]).unwrap();
    let exported = std::fs::read(state.join("runs/out/feed/masks.safetensors")).unwrap();
    assert_eq!(masks, exported);
    assert!(
        header
            .as_object()
            .unwrap()
            .iter()
            .any(|(k, v)| k.contains("q_proj") && v["dtype"] == "U8"),
        "{header:#}"
    );
    let (_, run) = d.post_json("/v1/runs", &json!({"body": pipeline}), None);
    let second = run["id"].as_i64().unwrap();
    assert_eq!(d.wait_run(second, 60)["status"], "succeeded");
    let (status, body) = d.call("GET", &format!("/v1/runs/{first}/masks"), None, None);
    assert_eq!(status, 410, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        d.call("GET", &format!("/v1/runs/{second}/masks"), None, None)
            .0,
        200
    );
    let (_, run) = d.post_json(
        "/v1/runs",
        &json!({"body": format!("{TINY}[[stage]]\nplugin = \"magnitude\"\ndensity = 0.5\n")}),
        None,
    );
    let unexported = run["id"].as_i64().unwrap();
    d.wait_run(unexported, 60);
    let (status, body) = d.call("GET", &format!("/v1/runs/{unexported}/masks"), None, None);
    assert_eq!(status, 404);
    assert!(
        String::from_utf8_lossy(&body).contains("[export]"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let status = d.stop();
    assert!(status.success(), "{status:?}");
}

/// A chunked SSE body: the `data:` payloads in order.
fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// The OpenAI-compatible API under `/openai/v1`: models, completions and chat completions,
/// streamed and not, greedy answers equal to `espalier generate`'s and independent of other
/// requests in flight, and OpenAI-style errors.
/// `STATE/models/tiny`: a tiny Hugging Face folder (the engine's LLaMA fixture, with a real
/// byte-level BPE tokenizer) with SmolLM2's chat template. Returns the folder.
fn tiny_chat_model(state: &std::path::Path) -> std::path::PathBuf {
    let tiny = state.join("models/tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    let fixtures = binary::repo().join("engine/tests/fixtures/llama");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixtures.join(f), tiny.join(f)).unwrap();
    }
    let chat_fixture: Value = serde_json::from_slice(
        &std::fs::read(binary::repo().join("tests/fixtures/chat_template_smollm2.json")).unwrap(),
    )
    .unwrap();
    std::fs::write(
        tiny.join("tokenizer_config.json"),
        chat_fixture["tokenizer_config"].to_string(),
    )
    .unwrap();
    tiny
}

#[test]
fn openai_compatible_completions_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    tiny_chat_model(&state);
    let d = Daemon::start(&state, true);

    let (s, models) = d.get("/openai/v1/models");
    assert_eq!(s, 200);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"models/tiny") && ids.contains(&"builtin:tiny-llama"),
        "{ids:?}"
    );

    // A greedy completion equals `espalier generate`.
    let body =
        json!({"model": "builtin:tiny-llama", "prompt": "Once", "max_tokens": 8, "temperature": 0});
    let (s, c) = d.post_json("/openai/v1/completions", &body, Some(TOKEN));
    assert_eq!(s, 200, "{c:#}");
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["usage"]["completion_tokens"], 8);
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    // What `espalier generate builtin:tiny-llama --prompt Once --max-tokens 8 EXTRA…` prints.
    let generated = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "builtin:tiny-llama",
            "--prompt",
            "Once",
            "--max-tokens",
            "8",
        ];
        args.extend_from_slice(extra);
        let printed = binary::text(&binary::espalier(&args, dir.path())).0;
        printed.strip_suffix('\n').unwrap_or(&printed).to_string()
    };
    assert_eq!(generated(&[]), c["choices"][0]["text"].as_str().unwrap());
    // The response says what the model runs on.
    let fingerprint = c["system_fingerprint"].as_str().unwrap_or_default();
    assert!(
        fingerprint.contains("linears: dense") && fingerprint.ends_with("KV cache f32"),
        "{c:#}"
    );
    // A storage suffix loads the model in that storage, as `generate --storage` does.
    let (s, in_bf16) = d.post_json(
        "/openai/v1/completions",
        &json!({"model": "builtin:tiny-llama@bf16", "prompt": "Once", "max_tokens": 8,
                "temperature": 0}),
        Some(TOKEN),
    );
    assert_eq!(s, 200, "{in_bf16:#}");
    assert_eq!(in_bf16["model"], "builtin:tiny-llama@bf16");
    let fingerprint = in_bf16["system_fingerprint"].as_str().unwrap_or_default();
    assert!(
        fingerprint.contains("dense/bf16") && fingerprint.ends_with("KV cache f16"),
        "{in_bf16:#}"
    );
    assert_eq!(
        generated(&["--storage", "bf16"]),
        in_bf16["choices"][0]["text"].as_str().unwrap()
    );
    let (s, e) = d.post_json(
        "/openai/v1/completions",
        &json!({"model": "builtin:tiny-llama@fp8", "prompt": "x"}),
        Some(TOKEN),
    );
    assert_eq!(s, 404, "{e:#}");
    // Penalties on repeated tokens, as `generate` applies them.
    let (s, penalized) = d.post_json(
        "/openai/v1/completions",
        &json!({"model": "builtin:tiny-llama", "prompt": "Once", "max_tokens": 8,
                "temperature": 0, "frequency_penalty": 1.5, "presence_penalty": 0.5,
                "repetition_penalty": 1.3}),
        Some(TOKEN),
    );
    assert_eq!(s, 200, "{penalized:#}");
    assert_ne!(
        penalized["choices"][0]["text"], c["choices"][0]["text"],
        "the tiny model repeats one token greedily; the penalties must change that"
    );
    let cli_args = [
        "--frequency-penalty",
        "1.5",
        "--presence-penalty",
        "0.5",
        "--repeat-penalty",
        "1.3",
    ];
    assert_eq!(
        generated(&cli_args),
        penalized["choices"][0]["text"].as_str().unwrap()
    );
    let (s, e) = d.post_json(
        "/openai/v1/completions",
        &json!({"model": "builtin:tiny-llama", "prompt": "x", "frequency_penalty": 3}),
        Some(TOKEN),
    );
    assert_eq!(s, 400, "{e:#}");
    assert_eq!(e["error"]["param"], "frequency_penalty", "{e:#}");

    // Chat: streamed chunks add up to the non-streamed answer; the stream ends with [DONE].
    let chat = |stream: bool, content: &str| {
        json!({"model": "models/tiny", "messages": [{"role": "user", "content": content}],
               "max_tokens": 12, "temperature": 0, "stream": stream,
               "stream_options": {"include_usage": true}})
    };
    let (s, whole) = d.post_json(
        "/openai/v1/chat/completions",
        &chat(false, "hi"),
        Some(TOKEN),
    );
    assert_eq!(s, 200, "{whole:#}");
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let answer = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let chunks = stream_chunks(&d, "/openai/v1/chat/completions", &chat(true, "hi"));
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["system_fingerprint"], whole["system_fingerprint"]);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, answer);
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["finish_reason"].is_string())
    );
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);

    // Concurrent greedy requests each get exactly what they get alone.
    let prompts = ["hi", "tell me", "why", "the garden"];
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| {
            d.post_json("/openai/v1/chat/completions", &chat(false, p), Some(TOKEN))
                .1
        })
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let d = &d;
                scope.spawn(move || {
                    d.post_json("/openai/v1/chat/completions", &chat(false, p), Some(TOKEN))
                })
            })
            .collect();
        for (h, want) in handles.into_iter().zip(&alone) {
            let (s, got) = h.join().unwrap();
            assert_eq!(s, 200, "{got:#}");
            assert_eq!(got["choices"][0]["message"], want["choices"][0]["message"]);
        }
    });

    // Errors, OpenAI style.
    let (s, e) = d.call(
        "POST",
        "/openai/v1/chat/completions",
        Some(("application/json", b"{not json".to_vec())),
        Some(TOKEN),
    );
    assert_eq!(s, 400);
    let e: Value = serde_json::from_slice(&e).unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e:#}");
    let (s, e) = d.post_json(
        "/openai/v1/completions",
        &json!({"model": "models/nope", "prompt": "x"}),
        Some(TOKEN),
    );
    assert_eq!(s, 404, "{e:#}");
    assert_eq!(e["error"]["param"], "model");
    let (s, e) = d.post_json(
        "/openai/v1/completions",
        &json!({"model": "builtin:tiny-llama", "prompt": "x", "max_tokens": -3}),
        Some(TOKEN),
    );
    assert_eq!(s, 400, "{e:#}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
    let (s, e) = d.post_json(
        "/openai/v1/completions",
        &json!({"model": "builtin:tiny-llama", "prompt": "a".repeat(400)}),
        Some(TOKEN),
    );
    assert_eq!(s, 400, "{e:#}");
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    let (s, _) = d.post_json("/openai/v1/completions", &body, None);
    assert_eq!(s, 401, "the daemon's token is the API key");
    let status = d.stop();
    assert!(status.success(), "{status:?}");
}

/// The chunks of a streamed response (its `data:` lines before `[DONE]`), as JSON.
fn stream_chunks(d: &Daemon, path: &str, body: &Value) -> Vec<Value> {
    let (s, raw) = d.call(
        "POST",
        path,
        Some(("application/json", body.to_string().into_bytes())),
        Some(TOKEN),
    );
    assert_eq!(s, 200);
    let events = sse_data(&raw);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// `logprobs` and `echo` as lm-evaluation-harness's `local-completions` model uses them to
/// score multiple-choice tasks: the prompt's log-probabilities are the evaluation path's
/// (minus its NLL), the reply's tokens are ranked among their alternatives, streamed and
/// batched requests agree with single ones, and bad settings are refused naming the field.
#[test]
fn openai_logprobs_score_prompts_as_the_evaluation_does() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tiny = tiny_chat_model(&state);
    let model = espalier_engine::load_model(tiny.to_str().unwrap()).unwrap();
    let session = espalier_engine::Session::new(&model).unwrap();
    let tokenizer = espalier_engine::Tokenizer::from_model_dir(&tiny).unwrap();
    let d = Daemon::start(&state, true);
    let complete = |body: Value| {
        let (s, c) = d.post_json("/openai/v1/completions", &body, Some(TOKEN));
        assert_eq!(s, 200, "{c:#}");
        c
    };
    let f = |v: &Value| v.as_f64().unwrap();

    // What lm-eval sends for a loglikelihood request: token ids, echo, one alternative.
    let context = tokenizer.encode("Once upon a time").unwrap();
    let ids = tokenizer
        .encode("Once upon a time there was a garden")
        .unwrap();
    let c = complete(
        json!({"model": "models/tiny", "prompt": [ids], "temperature": 0,
                            "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": true}),
    );
    let choice = &c["choices"][0];
    let lp = &choice["logprobs"];
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_logprobs.len(), ids.len() + 1, "{lp:#}");
    assert!(token_logprobs[0].is_null() && lp["top_logprobs"][0].is_null());
    let nll = session.nll(&ids).unwrap();
    for (j, want) in nll.iter().enumerate() {
        let got = f(&token_logprobs[j + 1]);
        assert!(
            (got + f64::from(*want)).abs() < 1e-4,
            "token {j}: {got} vs -{want}"
        );
    }
    // lm-eval's parse: the continuation's sum, and whether each token was the most likely.
    let continuation: f64 = token_logprobs[context.len()..ids.len()].iter().map(f).sum();
    let want: f64 = nll[context.len() - 1..]
        .iter()
        .map(|&v| -f64::from(v))
        .sum();
    assert!(
        (continuation - want).abs() < 1e-3,
        "{continuation} vs {want}"
    );
    for (t, top) in token_logprobs[1..]
        .iter()
        .zip(&lp["top_logprobs"].as_array().unwrap()[1..])
    {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 2, "{top:?}");
        assert!(
            top.values().any(|v| v == t),
            "the token's own entry: {top:?}"
        );
    }
    // The reply's one token is greedy: its log-probability is the largest at its place.
    let last = ids.len();
    let best = lp["top_logprobs"][last]
        .as_object()
        .unwrap()
        .values()
        .map(f)
        .fold(f64::MIN, f64::max);
    assert_eq!(f(&token_logprobs[last]), best);
    let prompt_text = tokenizer.decode(&ids, false).unwrap();
    let text = choice["text"].as_str().unwrap();
    assert!(
        text.starts_with(&prompt_text) && text.len() > prompt_text.len(),
        "{text:?}"
    );
    // The prompt's tokens spell its text (the reply's one token may end inside a character).
    let tokens: String = lp["tokens"].as_array().unwrap()[..ids.len()]
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, prompt_text);
    assert_eq!(c["usage"]["prompt_tokens"], ids.len());

    // Several prompts in one request (text this time), scoring only (max_tokens 0): one choice
    // each, as each alone gets.
    let texts = ["The garden wall", "Once upon a time there was"];
    let both = complete(
        json!({"model": "models/tiny", "prompt": texts, "max_tokens": 0,
                               "echo": true, "logprobs": 0}),
    );
    assert_eq!(both["choices"].as_array().unwrap().len(), 2);
    for (i, t) in texts.iter().enumerate() {
        let alone = complete(json!({"model": "models/tiny", "prompt": t, "max_tokens": 0,
                                    "echo": true, "logprobs": 0}));
        let got = &both["choices"][i];
        assert_eq!(got["index"], i);
        assert_eq!(got["text"], *t);
        assert_eq!(got["finish_reason"], "length");
        assert_eq!(got["logprobs"], alone["choices"][0]["logprobs"]);
    }
    assert_eq!(both["usage"]["completion_tokens"], 0);
    // Streamed, two prompts' chunks interleave, each marked with its index, and add up to
    // the choices of the same request unstreamed; one usage chunk covers both.
    let two = |stream: bool| {
        json!({"model": "models/tiny", "prompt": texts, "max_tokens": 5, "temperature": 0,
               "echo": true, "logprobs": 1, "stream": stream,
               "stream_options": {"include_usage": true}})
    };
    let whole = complete(two(false));
    let chunks = stream_chunks(&d, "/openai/v1/completions", &two(true));
    for i in 0..2 {
        let mine = || {
            chunks
                .iter()
                .filter_map(|c| c["choices"].as_array()?.first().cloned())
                .filter(move |c| c["index"] == i)
        };
        let text: String = mine()
            .filter_map(|c| c["text"].as_str().map(String::from))
            .collect();
        assert_eq!(
            text,
            whole["choices"][i]["text"].as_str().unwrap(),
            "choice {i}"
        );
        let token_logprobs: Vec<Value> = mine()
            .filter_map(|c| c["logprobs"]["token_logprobs"].as_array().cloned())
            .flatten()
            .collect();
        assert_eq!(
            token_logprobs,
            *whole["choices"][i]["logprobs"]["token_logprobs"]
                .as_array()
                .unwrap(),
            "choice {i}"
        );
    }
    assert_eq!(chunks.last().unwrap()["usage"], whole["usage"]);

    // The reply's log-probabilities, streamed and not, agree.
    let body = |stream: bool| {
        json!({"model": "models/tiny", "prompt": "The garden", "max_tokens": 6,
               "temperature": 0, "logprobs": 2, "stream": stream})
    };
    let whole = complete(body(false));
    let whole_lp = &whole["choices"][0]["logprobs"];
    assert_eq!(
        whole_lp["token_logprobs"].as_array().unwrap().len(),
        6,
        "{whole:#}"
    );
    assert_eq!(whole_lp["text_offset"][0], 0);
    let chunks = stream_chunks(&d, "/openai/v1/completions", &body(true));
    let column = |name: &str| -> Vec<Value> {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["logprobs"][name].as_array())
            .flatten()
            .cloned()
            .collect()
    };
    for name in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(column(name), *whole_lp[name].as_array().unwrap(), "{name}");
    }
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, whole["choices"][0]["text"].as_str().unwrap());

    // Chat: `logprobs: true` with `top_logprobs`: an entry per token of the reply (the end
    // token is not part of it), each with its bytes.
    let chat = |stream: bool| {
        json!({"model": "models/tiny", "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 8, "temperature": 0, "logprobs": true, "top_logprobs": 2,
               "stream": stream})
    };
    let (s, c) = d.post_json("/openai/v1/chat/completions", &chat(false), Some(TOKEN));
    assert_eq!(s, 200, "{c:#}");
    let content = c["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len(),
        c["usage"]["completion_tokens"].as_u64().unwrap() as usize
    );
    for e in content {
        let bytes: Vec<u8> = e["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        if let Ok(text) = String::from_utf8(bytes) {
            assert_eq!(e["token"], text.as_str());
        }
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert!(f(&top[0]["logprob"]) >= f(&e["logprob"]), "{e:#}");
    }
    let streamed: Vec<Value> = stream_chunks(&d, "/openai/v1/chat/completions", &chat(true))
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&streamed, content);

    // Bad settings, each refused naming its field.
    let refused = |path: &str, body: Value, param: &str| {
        let (s, e) = d.post_json(path, &body, Some(TOKEN));
        assert_eq!(s, 400, "{body}: {e:#}");
        assert_eq!(e["error"]["param"], param, "{body}: {e:#}");
    };
    let cmpl = "/openai/v1/completions";
    let m = "models/tiny";
    refused(
        cmpl,
        json!({"model": m, "prompt": "x", "logprobs": 21}),
        "logprobs",
    );
    refused(
        cmpl,
        json!({"model": m, "prompt": "x", "logprobs": true}),
        "logprobs",
    );
    refused(
        cmpl,
        json!({"model": m, "prompt": "x", "top_logprobs": 2}),
        "top_logprobs",
    );
    refused(
        cmpl,
        json!({"model": m, "prompt": "x", "max_tokens": 0}),
        "max_tokens",
    );
    refused(cmpl, json!({"model": m, "prompt": [1, "a"]}), "prompt");
    refused(
        cmpl,
        json!({"model": m, "prompt": [[1, 2], [999_999]]}),
        "prompt",
    );
    refused(cmpl, json!({"model": m, "prompt": [-1]}), "prompt");
    refused(cmpl, json!({"model": m, "prompt": vec!["x"; 65]}), "prompt");
    let chat_url = "/openai/v1/chat/completions";
    let hi = json!([{"role": "user", "content": "hi"}]);
    refused(
        chat_url,
        json!({"model": m, "messages": hi, "top_logprobs": 2}),
        "top_logprobs",
    );
    refused(
        chat_url,
        json!({"model": m, "messages": hi, "logprobs": 3}),
        "logprobs",
    );
    let status = d.stop();
    assert!(status.success(), "{status:?}");
}

/// Uploads `bytes` with an optional signature header; status and body.
fn upload_signed(d: &Daemon, bytes: &[u8], signature: Option<&str>) -> (u16, Value) {
    let mut req = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
        .post(&d.url("/v1/plugins?replace=true"))
        .set("Content-Type", "application/wasm");
    if let Some(sig) = signature {
        req = req.set("x-espalier-signature", sig.trim());
    }
    let response = match req.send_bytes(bytes) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("upload: {e}"),
    };
    let status = response.status();
    let mut body = Vec::new();
    response.into_reader().read_to_end(&mut body).unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[test]
fn required_signatures_are_enforced_at_the_plugin_folder_and_at_upload() {
    let dir = tempfile::tempdir().unwrap();
    let espalier = |args: &[&str]| {
        let o = bin().args(args).current_dir(dir.path()).output().unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    espalier(&["keys", "generate", "team"]);
    let signed = dir.path().join("slow.wasm");
    std::fs::copy(wasm("slow_magnitude"), &signed).unwrap();
    espalier(&["plugins", "sign", "slow.wasm", "--key", "team"]);
    let signature = std::fs::read_to_string(dir.path().join("slow.wasm.sig")).unwrap();
    let state = dir.path().join("state");
    let d = Daemon::start_with(
        &state,
        false,
        &format!(
            "trusted_keys = [\"{}\"]\nrequire_signatures = true\n",
            dir.path().join("team.pub").display()
        ),
    );
    // An unsigned file dropped into the folder is refused, with the reason.
    std::fs::copy(wasm("forge_masks"), state.join("plugins/forge.wasm")).unwrap();
    let listed = d.wait_for("/v1/plugins", 30, "the unsigned file refused", |v| {
        v["rejected"].as_array().is_some_and(|r| !r.is_empty())
    });
    let reason = listed["rejected"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("not signed"), "{reason}");
    // Uploads: unsigned, and signed with another plugin's signature, are refused.
    let bytes = std::fs::read(&signed).unwrap();
    let (s, body) = upload_signed(&d, &bytes, None);
    assert_eq!(s, 400, "{body}");
    assert!(body.to_string().contains("not signed"), "{body}");
    let forge = std::fs::read(wasm("forge_masks")).unwrap();
    let (s, body) = upload_signed(&d, &forge, Some(&signature));
    assert_eq!(s, 400, "{body}");
    assert!(body.to_string().contains("another plugin"), "{body}");
    assert!(!state.join("plugins/slow-magnitude.wasm").exists());
    // Signed by the trusted key: registered, its signer listed, the signature kept beside it.
    let (s, body) = upload_signed(&d, &bytes, Some(&signature));
    assert_eq!(s, 201, "{body}");
    assert!(
        body["signer"].as_str().unwrap().ends_with("(trusted)"),
        "{body}"
    );
    assert!(state.join("plugins/slow-magnitude.wasm.sig").is_file());
    let (_, v) = d.get("/v1/plugins");
    let entry = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "slow-magnitude")
        .cloned()
        .unwrap();
    assert!(
        entry["signer"].as_str().unwrap().ends_with("(trusted)"),
        "{entry}"
    );
    d.stop();
}

/// With one generation slot and no queue, requests that arrive while one decodes get 429 at
/// once, with an OpenAI-style body, and the slot serves again once it is free.
#[test]
fn a_full_generation_queue_answers_429() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = Daemon::start_with(
        &state,
        false,
        "generation_slots = 1\ngeneration_queue = 0\n",
    );
    // Load the model first, so every request below only generates.
    let body = json!({"model": "builtin:tiny-llama", "prompt": "Once", "max_tokens": 200, "temperature": 0});
    assert_eq!(d.post_json("/openai/v1/completions", &body, None).0, 200);
    let statuses: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| scope.spawn(|| d.post_json("/openai/v1/completions", &body, None)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let served = statuses.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<&Value> = statuses
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(served + refused.len(), statuses.len(), "{statuses:?}");
    assert!(served >= 1 && !refused.is_empty(), "{statuses:?}");
    for b in refused {
        assert_eq!(b["error"]["code"], "queue_full", "{b:#}");
        assert_eq!(b["error"]["type"], "rate_limit_exceeded", "{b:#}");
    }
    assert_eq!(d.post_json("/openai/v1/completions", &body, None).0, 200);
    let status = d.stop();
    assert!(status.success(), "{status:?}");
}

/// The value of the Prometheus sample `name` (no labels) on `/metrics`.
fn metric(d: &Daemon, name: &str) -> f64 {
    let (s, body) = d.call("GET", "/metrics", None, None);
    assert_eq!(s, 200);
    let text = String::from_utf8_lossy(&body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

/// Continuous batching's edges, with one batch slot: a streaming client that disconnects frees
/// its slot at once (the scheduler counts it abandoned and nothing stays running, before the
/// deadline could have ended it), a generation past its deadline ends with the text so far and
/// finish_reason `length`, and a request whose KV cache alone exceeds the budget gets 503.
#[test]
fn a_disconnect_frees_its_batch_slot_and_deadlines_end_generations() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The fixture model with a long context and no EOS: a generation can only end by its
    // limits, the deadline or its client leaving.
    let long = state.join("models/long");
    std::fs::create_dir_all(&long).unwrap();
    let fixtures = binary::repo().join("engine/tests/fixtures/llama");
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixtures.join(f), long.join(f)).unwrap();
    }
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(fixtures.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = json!(1_000_000);
    config["eos_token_id"] = Value::Null;
    std::fs::write(long.join("config.json"), config.to_string()).unwrap();
    let d = Daemon::start_with(
        &state,
        false,
        "generation_slots = 1\ngeneration_queue = 4\nkv_cache_mib = 64\ngeneration_deadline_s = 4\n",
    );
    let short =
        json!({"model": "models/long", "prompt": "Once", "max_tokens": 2, "temperature": 0});
    assert_eq!(d.post_json("/openai/v1/completions", &short, None).0, 200);
    assert_eq!(metric(&d, "espalier_generation_running"), 0.0);

    // A stream that would run for minutes: read its first text, then hang up.
    let body = json!({"model": "models/long", "prompt": "Once", "max_tokens": 100_000,
                      "temperature": 0, "stream": true})
    .to_string();
    let addr = d.base.trim_start_matches("http://");
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        socket,
        "POST /openai/v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"text\"") {
        let n = socket.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(metric(&d, "espalier_generation_running"), 1.0);
    drop(socket);
    let hung_up = Instant::now();
    while metric(&d, "espalier_generations_abandoned_total") < 1.0 {
        assert!(
            hung_up.elapsed() < Duration::from_secs(3),
            "the disconnected stream still holds its slot"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric(&d, "espalier_generation_running"), 0.0);
    // The slot serves the next request.
    let (s, c) = d.post_json("/openai/v1/completions", &short, None);
    assert_eq!(s, 200, "{c:#}");
    assert_eq!(c["usage"]["completion_tokens"], 2);

    // The deadline ends a long generation with what it has.
    let long_body =
        json!({"model": "models/long", "prompt": "Once", "max_tokens": 100_000, "temperature": 0});
    let (s, c) = d.post_json("/openai/v1/completions", &long_body, None);
    assert_eq!(s, 200, "{c:#}");
    assert_eq!(c["choices"][0]["finish_reason"], "length");
    let n = c["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 0 && n < 100_000, "{c:#}");

    // 1M tokens of KV cache cannot fit in 64 MiB.
    let huge =
        json!({"model": "models/long", "prompt": "Once", "max_tokens": 900_000, "temperature": 0});
    let (s, e) = d.post_json("/openai/v1/completions", &huge, None);
    assert_eq!(s, 503, "{e:#}");
    assert_eq!(e["error"]["code"], "kv_cache_budget_exceeded", "{e:#}");
    let message = e["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("MiB of f32 KV cache"), "{e:#}");
    assert!(message.contains("kv_cache = \"f16\""), "{e:#}");
    let f32_mib = mib_needed(message);
    assert_eq!(metric(&d, "espalier_generation_running"), 0.0);
    assert_eq!(metric(&d, "espalier_generation_waiting"), 0.0);
    let status = d.stop();
    assert!(status.success(), "{status:?}");

    // `kv_cache = "f16"` reaches the model's sessions: the same request needs half the cache.
    let d = Daemon::start_with(
        &state,
        false,
        "kv_cache_mib = 64
kv_cache = \"f16\"\n",
    );
    let (s, c) = d.post_json("/openai/v1/completions", &short, None);
    assert_eq!(s, 200, "{c:#}");
    let (s, e) = d.post_json("/openai/v1/completions", &huge, None);
    assert_eq!(s, 503, "{e:#}");
    let message = e["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("MiB of f16 KV cache"), "{e:#}");
    assert_eq!(2 * mib_needed(message), f32_mib, "{e:#}");
    let status = d.stop();
    assert!(status.success(), "{status:?}");
}

/// The MiB a `kv_cache_budget_exceeded` message says the request needs.
fn mib_needed(message: &str) -> u64 {
    let (before, _) = message.split_once(" MiB of ").unwrap_or_default();
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no MiB figure in {message:?}"))
}
