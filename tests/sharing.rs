//! Sharing strategies between teams, driven through the binary: a pipeline packed with its
//! plugins and texts runs elsewhere with the same masks; a changed strategy is refused.

use std::path::Path;

#[path = "common/binary.rs"]
mod binary;
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
