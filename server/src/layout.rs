//! The state folder of a daemon and the rule that keeps requests inside it: every path a
//! pipeline sent over the API names (model folder, texts, export folder) must lie in the part
//! of the state folder meant for it, after symlinks are resolved.

use std::path::{Component, Path, PathBuf};

use espalier::pipeline::{Pipeline, PipelineError};

/// The shipped calibration and evaluation texts, written into `data/` when missing so the
/// pipelines' default `data/calibration.txt` resolves inside the state folder.
const DEFAULT_TEXTS: &[(&str, &str)] = &[
    (
        "calibration.txt",
        include_str!("../../data/calibration.txt"),
    ),
    ("eval.txt", include_str!("../../data/eval.txt")),
];

/// Folders inside the state folder.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The state folder itself (absolute).
    pub root: PathBuf,
    /// Watched plugin folder.
    pub plugins: PathBuf,
    /// Watched pipeline folder.
    pub pipelines: PathBuf,
    /// Model folders (and `fetch:` downloads).
    pub models: PathBuf,
    /// One folder per run (report, export).
    pub runs: PathBuf,
    /// Texts pipelines may read.
    pub data: PathBuf,
    /// Compiled components.
    pub cache: PathBuf,
    /// The run database.
    pub database: PathBuf,
}

impl Layout {
    /// Creates the state folder and its subfolders when missing (nothing existing is
    /// replaced) and writes the default texts into `data/` when they are absent.
    pub fn init(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let layout = Layout {
            plugins: root.join("plugins"),
            pipelines: root.join("pipelines"),
            models: root.join("models"),
            runs: root.join("runs"),
            data: root.join("data"),
            cache: root.join("cache"),
            database: root.join("espalier.sqlite"),
            root,
        };
        for dir in [
            &layout.plugins,
            &layout.pipelines,
            &layout.models,
            &layout.runs,
            &layout.data,
            &layout.cache,
        ] {
            std::fs::create_dir_all(dir)?;
        }
        for (name, text) in DEFAULT_TEXTS {
            let path = layout.data.join(name);
            if !path.exists() {
                espalier::atomic::write_atomic(&path, text.as_bytes())?;
            }
        }
        Ok(layout)
    }

    /// Parses pipeline text as the daemon runs it: relative paths from the state folder, a
    /// relative export folder inside `runs/`.
    pub fn parse(&self, label: &str, text: &str) -> Result<Pipeline, PipelineError> {
        Pipeline::parse_in_with_outputs(label, text, &self.root, &self.runs)
    }

    /// A model reference as a request may give it (pipeline `model` already resolved against
    /// the state folder, or an override as written): `builtin:`/`fetch:` names as they are, a
    /// folder only inside `models/`. Returns the reference to run with.
    pub fn model(&self, reference: &str) -> Result<String, String> {
        if reference.starts_with("builtin:") || reference.starts_with("fetch:") {
            return Ok(reference.to_string());
        }
        let path = self.root.join(reference);
        if inside(&path, &self.models) {
            Ok(path.display().to_string())
        } else {
            Err(format!(
                "a request may only name models in the daemon's model folder ({}): use a path relative to the state folder such as `models/NAME`, `builtin:NAME` or `fetch:NAME`",
                self.models.display()
            ))
        }
    }

    /// The folder of run `id`.
    pub fn run_dir(&self, id: i64) -> PathBuf {
        self.runs.join(format!("run-{id}"))
    }

    /// Checks that every path `pipeline` names lies where a request may reach: the model in
    /// `models/` (or `builtin:`/`fetch:`), texts anywhere in the state folder, the export
    /// folder in `runs/`. The error points at the line of the offending key.
    pub fn confine(&self, pipeline: &Pipeline) -> Result<(), PipelineError> {
        let model = &pipeline.model;
        self.model(&model.value)
            .map_err(|message| pipeline.error(&model.position, "model", message))?;
        if let Some(c) = &pipeline.calibration
            && !inside(&c.spec.text, &self.root)
        {
            return Err(pipeline.error(
                &c.text_position,
                "calibration.text",
                "a request may only read texts inside the daemon's state folder (e.g. `data/calibration.txt`)",
            ));
        }
        if let Some(f) = &pipeline.finetune {
            let fetched = f
                .spec
                .text
                .to_str()
                .is_some_and(|t| t.starts_with("fetch:"));
            if !fetched && !inside(&f.spec.text, &self.root) {
                return Err(pipeline.error(
                    &f.text_position,
                    "finetune.text",
                    "a request may only read texts inside the daemon's state folder (e.g. `data/train.txt`)",
                ));
            }
            if let Some(dir) = &f.spec.checkpoint_dir
                && !inside(dir, &self.runs)
            {
                return Err(pipeline.error(
                    &f.checkpoint_position,
                    "finetune.checkpoint_dir",
                    format!(
                        "a request may only keep checkpoints in the daemon's output folder ({})",
                        self.runs.display()
                    ),
                ));
            }
        }
        if let Some(e) = &pipeline.evaluate
            && let espalier::evaluate::EvalText::File(text) = &e.value.text
            && !inside(text, &self.root)
        {
            return Err(pipeline.error(
                &e.position,
                "evaluate.text",
                "a request may only read texts inside the daemon's state folder (e.g. `data/eval.txt`)",
            ));
        }
        if let Some(x) = &pipeline.export
            && !inside(&x.dir.value, &self.runs)
        {
            return Err(pipeline.error(
                &x.dir.position,
                "export.dir",
                format!(
                    "a request may only export into the daemon's output folder ({}); a relative `dir` such as `out/NAME` lands there",
                    self.runs.display()
                ),
            ));
        }
        for stage in &pipeline.stages {
            let name = &stage.plugin.value;
            if name.ends_with(".wasm") || name.contains('/') {
                return Err(pipeline.error(
                    &stage.plugin.position,
                    format!("stage[{}].plugin", stage.index),
                    "a request names plugins by their registered name; upload the .wasm (POST /v1/plugins) or drop it into the plugin folder",
                ));
            }
        }
        Ok(())
    }
}

/// Whether `path` lies inside `folder` (or is it): `..` is resolved lexically, then the
/// longest existing prefix through symlinks, so neither can lead out.
pub fn inside(path: &Path, folder: &Path) -> bool {
    let Some(lexical) = normalise(path) else {
        return false;
    };
    // Resolve symlinks in the part that exists; the rest (a folder the run will create) is
    // appended as written, already free of `..`.
    let mut existing = lexical.clone();
    let mut rest = Vec::new();
    let resolved = loop {
        match existing.canonicalize() {
            Ok(p) => break p,
            Err(_) => match (existing.file_name(), existing.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name.to_os_string());
                    existing = parent.to_path_buf();
                }
                _ => return false,
            },
        }
    };
    let mut full = resolved;
    for part in rest.into_iter().rev() {
        full.push(part);
    }
    full.starts_with(folder)
}

/// `path` made absolute and free of `.` and `..` without touching the file system; `None` for
/// a relative path (requests' paths were made absolute against the state folder already).
fn normalise(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_in_their_folder() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::init(dir.path()).unwrap();
        assert!(layout.data.join("calibration.txt").is_file());
        assert!(inside(&layout.models.join("m"), &layout.models));
        assert!(!inside(&layout.models.join("../runs"), &layout.models));
        assert!(!inside(Path::new("/etc/passwd"), &layout.root));
        // A symlink inside that points outside is outside.
        std::os::unix::fs::symlink("/tmp", layout.models.join("escape")).unwrap();
        assert!(!inside(&layout.models.join("escape/x"), &layout.models));

        let parse = |text: &str| layout.parse("req.toml", text).unwrap();
        assert!(
            layout
                .confine(&parse("model = \"builtin:tiny-llama\"\n"))
                .is_ok()
        );
        let e = layout
            .confine(&parse("model = \"/etc\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("req.toml:1:9: model:"), "{e}");
        let e = layout
            .confine(&parse(
                "model = \"builtin:tiny-llama\"\n[export]\ndir = \"../../out\"\n",
            ))
            .unwrap_err()
            .to_string();
        assert!(e.contains("req.toml:3:7: export.dir"), "{e}");
        // A CLI pipeline's relative export folder lands in runs/.
        let p = parse("model = \"builtin:tiny-llama\"\n[export]\ndir = \"out/tiny\"\n");
        assert_eq!(
            p.export.as_ref().unwrap().dir.value,
            layout.runs.join("out/tiny")
        );
        assert!(layout.confine(&p).is_ok());
        // [finetune]: the fetched default text and a relative checkpoint folder (in runs/) are
        // fine; a checkpoint folder that leaves runs/ is refused at its line.
        let p = parse("model = \"builtin:tiny-llama\"\n[finetune]\ncheckpoint_dir = \"ck\"\n");
        let spec = &p.finetune.as_ref().unwrap().spec;
        assert_eq!(spec.checkpoint_dir, Some(layout.runs.join("ck")));
        assert!(layout.confine(&p).is_ok());
        let e = layout
            .confine(&parse(
                "model = \"builtin:tiny-llama\"\n[finetune]\ncheckpoint_dir = \"/tmp/ck\"\n",
            ))
            .unwrap_err()
            .to_string();
        assert!(e.contains("req.toml:3:18: finetune.checkpoint_dir"), "{e}");
    }
}
