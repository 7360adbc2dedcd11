//! Each sandbox guarantee ARCHITECTURE.md states, checked from inside a plugin: the test plugin
//! `plugins/testing/probe-sandbox` tries, with plain `std`, what the sandbox forbids (files,
//! environment, network, clocks, randomness, state kept between calls, memory, time, host
//! tensors) and reports what it saw as JSON in its error; these tests read that report, and
//! check from the host side too where they can (a listener that must see no connection, a file
//! that must not appear).

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

#[allow(
    dead_code,
    reason = "each test binary uses a part of the shared helpers"
)]
mod common;
use common::run;

fn probe_wasm() -> PathBuf {
    let path = PathBuf::from(espalier::plugin::registry::BUILT_PLUGIN_DIR)
        .join("espalier_test_probe_sandbox.wasm");
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A one-stage pipeline running the probe with `sandbox` settings and stage `params`.
fn pipeline(sandbox: &str, params: &str) -> String {
    format!(
        "model = \"builtin:tiny-llama\"\n[sandbox]\n{sandbox}\n[[stage]]\nplugin = {:?}\ndensity = 0.5\n{params}\n",
        probe_wasm().display().to_string()
    )
}

/// Runs the probe; its report arrives as the run's error.
fn report(sandbox: &str, params: &str) -> Value {
    let err = run(&pipeline(sandbox, params))
        .err()
        .expect("the probe reports through its error")
        .to_string();
    parse_report(&err)
}

fn parse_report(err: &str) -> Value {
    let at = err
        .find("probe report: ")
        .unwrap_or_else(|| panic!("no probe report in: {err}"));
    let json = &err[at + "probe report: ".len()..];
    serde_json::Deserializer::from_str(json)
        .into_iter::<Value>()
        .next()
        .unwrap_or_else(|| panic!("no JSON in: {err}"))
        .unwrap_or_else(|e| panic!("bad JSON ({e}) in: {err}"))
}

#[test]
fn no_filesystem() {
    // A real file the host can read: the guest must not.
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "host data").unwrap();
    let r = report(
        "",
        &format!(
            "mode = \"probe\"\npath = {:?}",
            secret.display().to_string()
        ),
    );
    assert_eq!(r["fs_read_path"], false, "{r}");
    assert_eq!(r["fs_read_dir_root"], false, "{r}");
    assert_eq!(r["fs_read_dir_cwd"], false, "{r}");
    assert_eq!(r["fs_create"], false, "{r}");
    // Nothing appeared where the process runs, whatever the guest believed.
    assert!(!Path::new("espalier-probe.txt").exists());
}

#[test]
fn no_environment() {
    // The test process has variables (cargo sets several); the guest sees none of them.
    assert!(std::env::vars_os().count() > 0);
    let r = report("", "mode = \"probe\"");
    assert_eq!(r["env_vars"], 0, "{r}");
    assert_eq!(r["args"], 0, "{r}");
}

#[test]
fn no_network() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // A UDP socket on the same port number, to see whether a datagram arrives.
    let udp = UdpSocket::bind(("127.0.0.1", port)).ok();
    let r = report("", &format!("mode = \"probe\"\nport = {port}"));
    assert_eq!(r["tcp_connect"], false, "{r}");
    assert_eq!(r["udp_send"], false, "{r}");
    assert_eq!(r["dns_lookup"], false, "{r}");
    // And from the host side: no connection is waiting, no datagram came.
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "the guest connected to the host"
    );
    if let Some(udp) = udp {
        udp.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        assert!(udp.recv(&mut buf).is_err(), "the guest sent a datagram");
    }
}

#[test]
fn clocks_are_frozen() {
    let r = report("", "mode = \"probe\"");
    // The wall clock reads the epoch, and ~20 million iterations of guest work move the
    // monotonic clock by nothing at all (a real clock moves by milliseconds).
    assert_eq!(r["wall_ns"], 0, "{r}");
    assert_eq!(r["mono_elapsed_ns"], 0, "{r}");
}

#[test]
fn randomness_is_deterministic() {
    let a = report("", "mode = \"probe\"");
    let b = report("", "mode = \"probe\"");
    assert_eq!(a["getentropy_rc"], 0, "the entropy call itself works: {a}");
    let bytes = a["random"].as_str().unwrap();
    assert_eq!(bytes.len(), 64, "{a}");
    // The same bytes in every call (each call is a new instance in a new Store), through libc
    // and through std's hash-map keys.
    assert_eq!(a["random"], b["random"]);
    assert_eq!(a["hashmap_hash"], b["hashmap_hash"]);
}

#[test]
fn nothing_is_kept_between_calls() {
    // A static counter in the guest starts from zero in every call: one instance per call.
    for _ in 0..3 {
        let r = report("", "mode = \"probe\"");
        assert_eq!(r["calls"], 1, "{r}");
    }
}

#[test]
fn the_configured_memory_cap_is_used() {
    // 100 MiB of guest memory is within the default cap (1024 MiB)...
    let r = report("", "mode = \"grow\"\ngrow_mb = 100");
    assert_eq!(r["grew"], true, "{r}");
    assert_eq!(r["grew_mb"], 100, "{r}");
    // ...and refused under `memory_mb = 64`.
    let err = run(&pipeline(
        "memory_mb = 64",
        "mode = \"grow\"\ngrow_mb = 100",
    ))
    .err()
    .expect("100 MiB must not fit in 64")
    .to_string();
    assert!(
        err.contains("probe-sandbox") && err.contains("memory limit of 64 MiB"),
        "{err}"
    );
}

#[test]
fn the_configured_deadline_is_used() {
    // A guest that never returns, under a deadline far below the default (60 s). The bound
    // checked is 30 s, sixty times the deadline: a loaded machine cannot make a working
    // deadline miss it, and falling back to the default could not meet it.
    let started = Instant::now();
    let err = run(&pipeline("timeout_s = 0.5", "mode = \"spin\""))
        .err()
        .expect("a spinning guest must be stopped")
        .to_string();
    let took = started.elapsed().as_secs_f64();
    assert!(
        err.contains("probe-sandbox") && err.contains("time limit of 0.5 s"),
        "{err}"
    );
    assert!(
        took < 30.0,
        "stopped after {took:.1} s: the default deadline was used"
    );
}

#[test]
fn the_host_budget_is_released_when_handles_drop() {
    // Each allocation is a copy of tiny-llama's first target (16–32 KiB): 2000 of them add up
    // to well over 20 MiB through a 1 MiB budget, which holds only when each dropped handle
    // gives its bytes back.
    let sandbox = "host_memory_mb = 1\ntimeout_s = 60";
    let r = report(sandbox, "mode = \"churn\"\nrounds = 2000");
    let bytes = r["bytes"].as_u64().unwrap();
    assert_eq!(r["rounds"], 2000, "{r}");
    assert!(bytes > 20 << 20, "{r}");
    // The same allocations, kept, exhaust that budget: the setting is in force.
    let err = run(&pipeline(sandbox, "mode = \"hoard\"\nrounds = 2000"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("host tensor budget of 1 MiB"), "{err}");
}
