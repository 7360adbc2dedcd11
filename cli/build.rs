//! Records which build this binary is (the git commit it was built from, and the profile) as
//! `ESPALIER_BUILD`, so every report says exactly what produced it.

use std::path::Path;
use std::process::Command;

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(root)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let root = Path::new(&manifest).join("..");
    let commit = git(&root, &["rev-parse", "--short=12", "HEAD"]);
    // Rebuild when HEAD moves: the HEAD file (a branch switch) and the branch's ref (a commit).
    for path in [
        git(&root, &["rev-parse", "--git-path", "HEAD"]),
        git(&root, &["rev-parse", "--symbolic-full-name", "HEAD"])
            .and_then(|r| git(&root, &["rev-parse", "--git-path", &r])),
        git(&root, &["rev-parse", "--git-path", "packed-refs"]),
    ]
    .into_iter()
    .flatten()
    {
        let path = if Path::new(&path).is_absolute() {
            Path::new(&path).to_path_buf()
        } else {
            root.join(path)
        };
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    let profile = std::env::var("PROFILE").unwrap_or_else(|_| "unknown".into());
    let build = match commit {
        Some(c) => format!("git {c}, {profile}"),
        None => format!("no git checkout, {profile}"),
    };
    println!("cargo:rustc-env=ESPALIER_BUILD={build}");
}
