//! Sharing strategies between teams, driven through the binary: a pipeline packed with its
//! plugins and texts runs elsewhere with the same masks; a changed strategy is refused;
//! signatures; plugins pushed to and pulled from an OCI registry (Debian's `docker-registry`,
//! started here on a loopback port) by the CLI, by pipelines and by the daemon, and a hostile
//! registry that is cut off.

use std::path::Path;

#[path = "common/binary.rs"]
mod binary;
#[path = "common/daemon.rs"]
mod daemon;
use binary::{espalier, text, wasm, write};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("espalier-sharing-")
        .tempdir()
        .unwrap()
}

/// A deterministic calibration text (letters cycling through words).
fn calibration_text() -> String {
    (0..600)
        .map(|i| ["prune", "the", "model", "with", "care", "and", "measure"][i % 7])
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_ok(args: &[&str], cwd: &Path) -> String {
    let o = espalier(args, cwd);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{args:?}\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn a_packed_strategy_runs_elsewhere_with_the_same_masks_and_refuses_changes() {
    let team_a = tmp();
    write(team_a.path(), "calib.txt", &calibration_text());
    // A built-in criterion (by name) and a plugin file (by path, here a 0.2 Wanda): the
    // strategy must carry both builds and the calibration text.
    let legacy = wasm("legacy_v02");
    let pipeline = write(
        team_a.path(),
        "strategy.toml",
        &format!(
            "name = \"shared\"\nmodel = \"builtin:tiny-llama\"\n[calibration]\ntext = \"calib.txt\"\nsamples = 4\nseq_len = 32\n\
             [[stage]]\nplugin = \"{}\"\ntargets = [\"*.mlp.*\"]\ndensity = 0.6\n\
             [[stage]]\nplugin = \"magnitude\"\ntargets = [\"*.self_attn.*\"]\ndensity = 0.5\n\
             [export]\ndir = \"out/original\"\n",
            legacy.display()
        ),
    );
    run_ok(&["run", pipeline.to_str().unwrap()], team_a.path());
    let original = std::fs::read(team_a.path().join("out/original/masks.safetensors")).unwrap();
    let packed = run_ok(
        &["strategy", "pack", "strategy.toml", "shared.tar"],
        team_a.path(),
    );
    assert!(packed.contains("2 plugin(s), 1 text(s)"), "{packed}");
    // Packing never overwrites.
    let o = espalier(
        &["strategy", "pack", "strategy.toml", "shared.tar"],
        team_a.path(),
    );
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(text(&o).1.contains("already exists"), "{:?}", text(&o));

    // Team B has neither the plugin file nor the text: only the strategy.
    let team_b = tmp();
    std::fs::copy(
        team_a.path().join("shared.tar"),
        team_b.path().join("shared.tar"),
    )
    .unwrap();
    let out = run_ok(&["run", "shared.tar", "--out", "from-tar"], team_b.path());
    assert!(out.contains("exported to"), "{out}");
    let from_tar = std::fs::read(team_b.path().join("from-tar/masks.safetensors")).unwrap();
    assert!(
        original == from_tar,
        "masks of the packed strategy differ from the original's"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(team_b.path().join("from-tar/report.json")).unwrap())
            .unwrap();
    let legacy_sha = espalier::plugin::runtime::sha256_hex(&std::fs::read(&legacy).unwrap());
    assert_eq!(report["stages"][0]["plugin_sha256"], legacy_sha.as_str());

    // Unpacked into a folder, it runs the same; a folder that is not empty is refused.
    run_ok(
        &["strategy", "unpack", "shared.tar", "unpacked"],
        team_b.path(),
    );
    let o = espalier(
        &["strategy", "unpack", "shared.tar", "unpacked"],
        team_b.path(),
    );
    assert!(
        !o.status.success() && text(&o).1.contains("not empty"),
        "{:?}",
        text(&o)
    );
    let pinned = std::fs::read_to_string(team_b.path().join("unpacked/pipeline.toml")).unwrap();
    assert!(
        pinned.contains(&format!("legacy-v02@sha256:{legacy_sha}"))
            && pinned.contains("texts/calibration.txt"),
        "{pinned}"
    );
    run_ok(&["run", "unpacked", "--out", "from-dir"], team_b.path());
    let from_dir = std::fs::read(team_b.path().join("from-dir/masks.safetensors")).unwrap();
    assert!(original == from_dir);

    // One byte of a plugin flipped after unpacking: refused before anything runs.
    let plugin = std::fs::read_dir(team_b.path().join("unpacked/plugins"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("legacy-v02"))
        .unwrap();
    let mut bytes = std::fs::read(&plugin).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&plugin, &bytes).unwrap();
    let o = espalier(&["run", "unpacked", "--no-export"], team_b.path());
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("changed after it was packed") && stderr.contains(&legacy_sha),
        "{stderr}"
    );
}

#[test]
fn a_damaged_or_foreign_archive_is_refused_clearly() {
    let dir = tmp();
    let not_tar = write(
        dir.path(),
        "x.tar",
        "this is not a tar file at all, just text\n",
    );
    let o = espalier(
        &["strategy", "unpack", not_tar.to_str().unwrap(), "d"],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2), "{:?}", text(&o));
    assert!(!dir.path().join("d").exists());
    // A tar whose entry tries to leave the folder.
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
    header.set_cksum();
    builder.append(&header, &b"abc"[..]).unwrap();
    std::fs::write(dir.path().join("evil.tar"), builder.into_inner().unwrap()).unwrap();
    let o = espalier(&["run", "evil.tar", "--no-export"], dir.path());
    let (_, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unexpected entry `../escape`"), "{stderr}");
    assert!(!dir.path().parent().unwrap().join("escape").exists());
}

/// A copy of a built test plugin in `dir` (so a signature can sit beside it).
fn plugin_copy(dir: &Path, stem: &str, name: &str) -> std::path::PathBuf {
    let to = dir.join(name);
    std::fs::copy(wasm(stem), &to).unwrap();
    to
}

#[test]
fn signed_plugins_verify_and_tampered_untrusted_or_misplaced_signatures_are_refused() {
    let dir = tmp();
    let d = dir.path();
    run_ok(&["keys", "generate", "team-a"], d);
    run_ok(&["keys", "generate", "team-b"], d);
    // Keys are never overwritten.
    let o = espalier(&["keys", "generate", "team-a"], d);
    assert!(!o.status.success() && text(&o).1.contains("already exists"));
    let plugins = d.join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let slow = plugin_copy(&plugins, "slow_magnitude", "slow.wasm");
    let signed = run_ok(
        &["plugins", "sign", "plugins/slow.wasm", "--key", "team-a"],
        d,
    );
    assert!(signed.contains("slow.wasm.sig"), "{signed}");
    let verified = run_ok(
        &[
            "plugins",
            "verify",
            "plugins/slow.wasm",
            "--trust",
            "team-a.pub",
        ],
        d,
    );
    assert!(verified.contains("(trusted)"), "{verified}");

    let refused = |args: &[&str], needle: &str| {
        let o = espalier(args, d);
        let (stdout, stderr) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}\n{stdout}\n{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    };
    // Signed by a key this side does not trust.
    refused(
        &[
            "plugins",
            "verify",
            "plugins/slow.wasm",
            "--trust",
            "team-b.pub",
        ],
        "which is not trusted",
    );
    // A key file that is not a key, or the wrong half.
    write(d, "junk", "not a key\n");
    refused(
        &[
            "plugins",
            "sign",
            "plugins/slow.wasm",
            "--key",
            "junk",
            "--force",
        ],
        "not a secret key file",
    );
    refused(
        &[
            "plugins",
            "sign",
            "plugins/slow.wasm",
            "--key",
            "team-a.pub",
            "--force",
        ],
        "it is a public key",
    );
    refused(
        &[
            "plugins",
            "verify",
            "plugins/slow.wasm",
            "--trust",
            "team-a",
        ],
        "not a public key file",
    );
    // The signature of one plugin beside another.
    plugin_copy(&plugins, "forge_masks", "other.wasm");
    std::fs::copy(
        plugins.join("slow.wasm.sig"),
        plugins.join("other.wasm.sig"),
    )
    .unwrap();
    refused(
        &["plugins", "verify", "plugins/other.wasm"],
        "belongs to another plugin",
    );
    std::fs::remove_file(plugins.join("other.wasm.sig")).unwrap();
    std::fs::remove_file(plugins.join("other.wasm")).unwrap();

    // Listing shows the signer; with signatures required the signed, trusted plugin runs.
    let list = run_ok(
        &[
            "plugins",
            "list",
            "--json",
            "--plugin-dir",
            "plugins",
            "--trust",
            "team-a.pub",
        ],
        d,
    );
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "slow-magnitude")
        .unwrap();
    assert!(
        entry["signer"].as_str().unwrap().ends_with("(trusted)"),
        "{entry}"
    );
    let magnitude = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "magnitude")
        .unwrap();
    assert_eq!(magnitude["signer"], "builtin");
    let pipeline = write(
        d,
        "p.toml",
        "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"slow-magnitude\"\ndensity = 0.5\nspin = 0\n",
    );
    let args = |extra: &[&'static str]| {
        let mut a = vec![
            "run",
            pipeline.to_str().unwrap(),
            "--no-export",
            "--json",
            "--plugin-dir",
            "plugins",
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let strict = args(&["--require-signatures", "--trust", "team-a.pub"]);
    let report = run_ok(&strict.iter().map(String::as_str).collect::<Vec<_>>(), d);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(
        report["stages"][0]["plugin_signer"]
            .as_str()
            .unwrap()
            .ends_with("(trusted)"),
        "{}",
        report["stages"][0]
    );
    // Untrusted signer, then one byte flipped: refused at run with the reason.
    let other_key = args(&["--require-signatures", "--trust", "team-b.pub"]);
    refused(
        &other_key.iter().map(String::as_str).collect::<Vec<_>>(),
        "which is not trusted",
    );
    let mut bytes = std::fs::read(&slow).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&slow, &bytes).unwrap();
    refused(
        &[
            "plugins",
            "verify",
            "plugins/slow.wasm",
            "--trust",
            "team-a.pub",
        ],
        "changed after it was signed",
    );
    // Unsigned under required signatures: refused, the reason named at the stage.
    std::fs::remove_file(plugins.join("slow.wasm.sig")).unwrap();
    std::fs::copy(wasm("slow_magnitude"), &slow).unwrap();
    refused(
        &strict.iter().map(String::as_str).collect::<Vec<_>>(),
        "not signed",
    );
    let report = run_ok(&args(&[]).iter().map(String::as_str).collect::<Vec<_>>(), d);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["stages"][0]["plugin_signer"], "unsigned");
}

// ----- OCI registries -----

/// Debian's `docker-registry` (the CNCF distribution registry) on a free loopback port, its
/// storage in a temporary folder; stopped when dropped.
struct LocalRegistry {
    child: std::process::Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl LocalRegistry {
    /// Starts one, or says why it cannot and returns `None` (a failure instead with
    /// `ESPALIER_REQUIRE_REGISTRY=1`, as CI sets: CI never skips these).
    fn start() -> Option<LocalRegistry> {
        let binary = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("docker-registry"))
                .find(|p| p.is_file())
        });
        let Some(binary) = binary else {
            let why = "`docker-registry` (Debian's CNCF distribution registry: apt-get install docker-registry) is not on PATH";
            assert!(
                std::env::var_os("ESPALIER_REQUIRE_REGISTRY").is_none_or(|v| v != "1"),
                "{why}, and ESPALIER_REQUIRE_REGISTRY=1"
            );
            eprintln!("SKIPPED: {why}; this registry test did not run");
            return None;
        };
        let dir = tmp();
        // A free port: bind, read it, release it for the registry.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = write(
            dir.path(),
            "config.yml",
            &format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        );
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = std::process::Command::new(binary)
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let registry = LocalRegistry { child, addr, dir };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let agent = ureq::AgentBuilder::new()
            .timeout(std::time::Duration::from_secs(2))
            .build();
        while agent
            .get(&format!("http://{}/v2/", registry.addr))
            .call()
            .is_err()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry did not answer within 20 s: {}",
                std::fs::read_to_string(registry.dir.path().join("registry.log"))
                    .unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Some(registry)
    }

    /// The registry's stored copy of the blob with sha256 `hex`.
    fn blob_file(&self, hex: &str) -> std::path::PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary in `cwd` with registry credentials isolated (an empty Docker config).
fn oci_cmd(args: &[&str], cwd: &Path) -> std::process::Output {
    binary::bin()
        .args(args)
        .current_dir(cwd)
        .env("DOCKER_CONFIG", cwd.join("no-docker-config"))
        .env_remove("ESPALIER_REGISTRY_USERNAME")
        .env_remove("ESPALIER_REGISTRY_PASSWORD")
        .env_remove("ESPALIER_REGISTRY_HOST")
        .env("ESPALIER_REGISTRY_TIMEOUT", "20")
        .output()
        .expect("run espalier")
}

fn oci_ok(args: &[&str], cwd: &Path) -> String {
    let o = oci_cmd(args, cwd);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{args:?}\n{stdout}\n{stderr}");
    stdout
}

/// Runs a command that must fail; returns its stderr.
fn oci_fails(args: &[&str], cwd: &Path, needle: &str) -> String {
    let o = oci_cmd(args, cwd);
    let (stdout, stderr) = text(&o);
    assert!(!o.status.success(), "{args:?} succeeded:\n{stdout}");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected `{needle}` in:\n{stderr}"
    );
    stderr
}

/// The files in `dir` (none when it does not exist).
fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `manifest digest: sha256:HEX` from `plugins push` output.
fn pushed_digest(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("manifest digest: "))
        .unwrap_or_else(|| panic!("no digest in {stdout}"))
        .trim()
        .to_string()
}

#[test]
fn plugins_travel_through_an_oci_registry_verified_signed_and_pinned() {
    let Some(registry) = LocalRegistry::start() else {
        return;
    };
    let work = tmp();
    let d = work.path();
    let host = registry.addr.clone();
    oci_ok(&["keys", "generate", "team-a"], d);
    oci_ok(&["keys", "generate", "team-b"], d);
    std::fs::create_dir(d.join("a")).unwrap();
    let original = plugin_copy(&d.join("a"), "slow_magnitude", "slow.wasm");
    oci_ok(&["plugins", "sign", "a/slow.wasm", "--key", "team-a"], d);
    let bytes = std::fs::read(&original).unwrap();
    let sha = espalier::plugin::runtime::sha256_hex(&bytes);
    let signature = std::fs::read(d.join("a/slow.wasm.sig")).unwrap();

    // Push (signed), then pull by tag and by digest: the same bytes and signature.
    let tag = format!("{host}/team-a/slow:1.0");
    let pushed = oci_ok(&["plugins", "push", "a/slow.wasm", &tag], d);
    assert!(
        pushed.contains(&sha) && pushed.contains("signed by key"),
        "{pushed}"
    );
    let digest = pushed_digest(&pushed);
    let pinned = format!("oci://{host}/team-a/slow@{digest}");
    assert!(pushed.contains(&pinned), "{pushed}");
    let strict = ["--trust", "team-a.pub", "--require-signatures"];
    let pull = |reference: &str, dir: &str, extra: &[&str]| {
        let mut args = vec!["plugins", "pull", reference, "--dir", dir];
        args.extend_from_slice(extra);
        oci_cmd(&args, d)
    };
    let o = pull(&tag, "b", &strict);
    assert!(o.status.success(), "{:?}", text(&o));
    let out = text(&o).0;
    assert!(
        out.contains(&sha) && out.contains(&pinned) && out.contains("(trusted)"),
        "{out}"
    );
    assert!(std::fs::read(d.join("b/slow-magnitude.wasm")).unwrap() == bytes);
    assert!(std::fs::read(d.join("b/slow-magnitude.wasm.sig")).unwrap() == signature);
    let by_digest = format!("{host}/team-a/slow@{digest}");
    assert!(pull(&by_digest, "c", &strict).status.success());
    assert!(std::fs::read(d.join("c/slow-magnitude.wasm")).unwrap() == bytes);
    // Pulling the same plugin again is harmless; a different file of that name is never
    // replaced.
    assert!(pull(&tag, "b", &[]).status.success());
    std::fs::create_dir(d.join("taken")).unwrap();
    write(
        &d.join("taken"),
        "slow-magnitude.wasm",
        "someone else's file",
    );
    let o = pull(&tag, "taken", &[]);
    assert!(
        !o.status.success() && text(&o).1.contains("exists and is not this plugin"),
        "{:?}",
        text(&o)
    );
    assert_eq!(
        std::fs::read_to_string(d.join("taken/slow-magnitude.wasm")).unwrap(),
        "someone else's file"
    );

    // Signature policy: an untrusted signer or an unsigned artifact is refused, nothing written.
    oci_fails(
        &[
            "plugins",
            "pull",
            &tag,
            "--dir",
            "e",
            "--trust",
            "team-b.pub",
            "--require-signatures",
        ],
        d,
        "which is not trusted",
    );
    std::fs::create_dir(d.join("u")).unwrap();
    plugin_copy(&d.join("u"), "slow_magnitude", "slow.wasm");
    let unsigned = format!("{host}/team-a/unsigned:1");
    oci_ok(&["plugins", "push", "u/slow.wasm", &unsigned], d);
    oci_fails(
        &[
            "plugins",
            "pull",
            &unsigned,
            "--dir",
            "e",
            "--require-signatures",
        ],
        d,
        "not signed",
    );
    // A missing tag: a clear error, nothing written.
    oci_fails(
        &[
            "plugins",
            "pull",
            &format!("{host}/team-a/slow:2.0"),
            "--dir",
            "e",
        ],
        d,
        "has no tag `2.0` in repository `team-a/slow`",
    );
    assert!(
        files_in(&d.join("e")).is_empty(),
        "{:?}",
        files_in(&d.join("e"))
    );

    // A pipeline names the plugin by reference: pulled once into the cache, and the report
    // pins the manifest digest and the component's sha256. By tag, the report pins the
    // digest the tag resolved to.
    let cache = d.join("cache");
    let run = |plugin: &str| {
        write(
            d,
            "p.toml",
            &format!(
                "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"{plugin}\"\ndensity = 0.5\nspin = 0\n"
            ),
        );
        binary::bin()
            .args([
                "run",
                "p.toml",
                "--no-export",
                "--json",
                "--trust",
                "team-a.pub",
                "--require-signatures",
            ])
            .current_dir(d)
            .env("ESPALIER_CACHE", &cache)
            .env("DOCKER_CONFIG", d.join("no-docker-config"))
            .output()
            .unwrap()
    };
    for reference in [pinned.clone(), format!("oci://{tag}")] {
        let o = run(&reference);
        let (stdout, stderr) = text(&o);
        assert!(o.status.success(), "{reference}: {stderr}");
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let stage = &report["stages"][0];
        assert_eq!(stage["plugin_source"], pinned.as_str(), "{stage}");
        assert_eq!(stage["plugin_sha256"], sha.as_str(), "{stage}");
        assert!(
            stage["plugin_signer"]
                .as_str()
                .unwrap()
                .ends_with("(trusted)")
        );
        assert_eq!(stage["name"], "slow", "{stage}");
    }
    assert!(cache.join(format!("oci/blobs/{sha}.wasm")).is_file());

    // One byte of the registry's stored component flipped: the pull is refused by digest and
    // nothing is written. The digest-pinned pipeline still runs from the cache, which holds
    // what was verified before.
    let blob = registry.blob_file(&sha);
    let mut stored = std::fs::read(&blob).unwrap();
    let middle = stored.len() / 2;
    stored[middle] ^= 0x01;
    std::fs::write(&blob, &stored).unwrap();
    oci_fails(
        &["plugins", "pull", &tag, "--dir", "f"],
        d,
        "the registry's copy is corrupt or was altered",
    );
    assert!(files_in(&d.join("f")).is_empty());
    let o = run(&pinned);
    assert!(o.status.success(), "{:?}", text(&o));

    // The registry down: a clear error, nothing written.
    drop(registry);
    let stderr = oci_fails(
        &["plugins", "pull", &tag, "--dir", "g"],
        d,
        &format!("cannot reach the registry {host} over http"),
    );
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(files_in(&d.join("g")).is_empty());
}

/// A loopback "registry" that misbehaves on purpose, by repository: `huge` answers the
/// manifest with an endless body, `blob` declares a 100-byte component and then sends an
/// endless one, `stall` sends headers and then nothing, `auth` asks for credentials. Every
/// connection is bounded (at most 256 MiB or 30 s), and the thread ends with the test process.
fn hostile_registry() -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = br#"{"created":"2026-01-01T00:00:00Z","architecture":"wasm","os":"wasip2","layerDigests":[]}"#;
    let sha = |b: &[u8]| format!("sha256:{}", espalier::plugin::runtime::sha256_hex(b));
    let config_digest = sha(config);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.wasm.config.v0+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/wasm","digest":"{}","size":100}}]}}"#,
        config.len(),
        sha(b"never sent")
    );
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let manifest = manifest.clone();
            let config_digest = config_digest.clone();
            std::thread::spawn(move || {
                let _ = stream.set_write_timeout(Some(std::time::Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                let _ = reader.read_line(&mut request);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
                let endless = |mut s: std::net::TcpStream, content_type: &str| {
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n\r\n"
                    );
                    let chunk = vec![b'{'; 1 << 16];
                    let start = std::time::Instant::now();
                    for _ in 0..(256 << 20) / chunk.len() {
                        if s.write_all(&chunk).is_err() || start.elapsed().as_secs() > 30 {
                            break;
                        }
                    }
                };
                let reply = |mut s: std::net::TcpStream, head: &str, body: &[u8]| {
                    let _ = write!(
                        s,
                        "HTTP/1.1 {head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(body);
                };
                if path == "/v2/" {
                    reply(stream, "200 OK", b"{}");
                } else if path.starts_with("/v2/huge/") {
                    endless(stream, "application/vnd.oci.image.manifest.v1+json");
                } else if path.starts_with("/v2/blob/w/manifests/") {
                    reply(
                        stream,
                        "200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json",
                        manifest.as_bytes(),
                    );
                } else if path == format!("/v2/blob/w/blobs/{config_digest}") {
                    reply(stream, "200 OK", config);
                } else if path.starts_with("/v2/blob/w/blobs/") {
                    endless(stream, "application/octet-stream");
                } else if path.starts_with("/v2/stall/") {
                    let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{{");
                    std::thread::sleep(std::time::Duration::from_secs(30));
                } else if path.starts_with("/v2/auth/") {
                    reply(
                        stream,
                        "401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"test\"",
                        b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
                    );
                } else {
                    reply(stream, "404 Not Found", b"{}");
                }
            });
        }
    });
    addr
}

#[test]
fn bad_references_and_hostile_registries_get_clear_errors_and_write_nothing() {
    let work = tmp();
    let d = work.path();
    let host = hostile_registry();
    let pull = |reference: &str, needle: &str| {
        let started = std::time::Instant::now();
        let stderr = oci_fails(&["plugins", "pull", reference, "--dir", "out"], d, needle);
        assert!(files_in(&d.join("out")).is_empty(), "{reference}");
        (stderr, started.elapsed())
    };
    // Malformed references, on the command line and in a pipeline (with its line).
    pull("team/wanda:1.0", "is not a registry reference");
    pull(
        &format!("{host}/team/wanda@sha256:12"),
        "is not a registry reference",
    );
    write(
        d,
        "bad.toml",
        "model = \"builtin:tiny-llama\"\n[[stage]]\nplugin = \"oci://wanda\"\ndensity = 0.5\n",
    );
    let stderr = oci_fails(
        &["run", "bad.toml", "--no-export"],
        d,
        "is not a registry reference",
    );
    assert!(stderr.contains("bad.toml:3"), "{stderr}");
    // An endless manifest and a component body past its declared size are cut off.
    let (stderr, took) = pull(&format!("{host}/huge/w:1"), "cut off");
    assert!(stderr.contains("4194304 bytes the manifest"), "{stderr}");
    assert!(took.as_secs() < 20, "{took:?}");
    let (stderr, _) = pull(&format!("{host}/blob/w:1"), "cut off");
    assert!(stderr.contains("100 bytes the component"), "{stderr}");
    // A registry that stops sending: cut off by the time limit.
    let o = binary::bin()
        .args([
            "plugins",
            "pull",
            &format!("{host}/stall/w:1"),
            "--dir",
            "out",
        ])
        .current_dir(d)
        .env("DOCKER_CONFIG", d.join("no-docker-config"))
        .env("ESPALIER_REGISTRY_TIMEOUT", "1")
        .output()
        .unwrap();
    let stderr = text(&o).1;
    assert!(
        !o.status.success() && stderr.contains("ESPALIER_REGISTRY_TIMEOUT"),
        "{stderr}"
    );
    // A registry that asks for credentials nobody configured.
    let (stderr, _) = pull(
        &format!("{host}/auth/w:1"),
        "the registry asks for credentials",
    );
    assert!(
        stderr.contains(&format!("no credentials for {host} were found")),
        "{stderr}"
    );
    // Credentials in the environment go only to the registry they name.
    let o = binary::bin()
        .args([
            "plugins",
            "pull",
            &format!("{host}/auth/w:1"),
            "--dir",
            "out",
        ])
        .current_dir(d)
        .env("DOCKER_CONFIG", d.join("no-docker-config"))
        .env("ESPALIER_REGISTRY_USERNAME", "u")
        .env("ESPALIER_REGISTRY_PASSWORD", "p")
        .env_remove("ESPALIER_REGISTRY_HOST")
        .output()
        .unwrap();
    assert!(
        text(&o).1.contains("ESPALIER_REGISTRY_HOST is not"),
        "{:?}",
        text(&o)
    );
    assert!(files_in(&d.join("out")).is_empty());
}

#[test]
fn the_daemon_pulls_plugins_by_reference_under_its_signature_policy() {
    let Some(registry) = LocalRegistry::start() else {
        return;
    };
    let work = tmp();
    let d = work.path();
    let host = registry.addr.clone();
    oci_ok(&["keys", "generate", "team-a"], d);
    std::fs::create_dir(d.join("a")).unwrap();
    let file = plugin_copy(&d.join("a"), "slow_magnitude", "slow.wasm");
    let sha = espalier::plugin::runtime::sha256_hex(&std::fs::read(&file).unwrap());
    std::fs::copy(&file, d.join("unsigned.wasm")).unwrap();
    oci_ok(&["plugins", "sign", "a/slow.wasm", "--key", "team-a"], d);
    let signed = format!("{host}/team-a/slow:1.0");
    let unsigned = format!("{host}/team-a/unsigned:1.0");
    oci_ok(&["plugins", "push", "a/slow.wasm", &signed], d);
    oci_ok(&["plugins", "push", "unsigned.wasm", &unsigned], d);

    let state = d.join("state");
    let daemon = daemon::Daemon::start_with(
        &state,
        true,
        &format!(
            "trusted_keys = [\"{}\"]\nrequire_signatures = true\n",
            d.join("team-a.pub").display()
        ),
    );
    let pull = |reference: &str, token: Option<&str>| {
        daemon.post_json(
            "/v1/plugins/pull",
            &serde_json::json!({ "reference": reference }),
            token,
        )
    };
    let token = Some(daemon::TOKEN);
    assert_eq!(pull(&signed, None).0, 401);
    // Unsigned under `require_signatures`: refused with the reason, nothing written.
    let (status, body) = pull(&unsigned, token);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not signed"),
        "{body}"
    );
    // Missing tag, malformed reference: clear errors.
    let (status, body) = pull(&format!("{host}/team-a/slow:9"), token);
    assert_eq!(status, 502, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("has no tag `9`"),
        "{body}"
    );
    let (status, body) = pull("team-a/slow:1.0", token);
    assert_eq!(status, 400, "{body}");
    assert!(
        files_in(&state.join("plugins")).is_empty(),
        "{:?}",
        files_in(&state.join("plugins"))
    );
    // Signed by a trusted key: registered, written with its signature.
    let (status, body) = pull(&signed, token);
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        daemon.plugin_sha("slow-magnitude").as_deref(),
        Some(sha.as_str())
    );
    assert!(state.join("plugins/slow-magnitude.wasm.sig").is_file());
    let (_, openapi) = daemon.get("/openapi.json");
    assert!(openapi["paths"]["/v1/plugins/pull"]["post"].is_object());
    daemon.stop();
}
