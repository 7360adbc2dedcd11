//! Every example pipeline in `pipelines/` is parsed and planned (plugins resolved, parameters
//! type-checked, targets globbed, calibration text tokenized), so an example that a change
//! breaks fails here. Those that name the fetched SmolLM2 are planned on
//! `builtin:smollm2-135m-shapes`, a random model with its shapes (no download); nothing runs.
//! The README's list of examples is checked against the folder as well.

use std::path::{Path, PathBuf};

use espalier::pipeline::Pipeline;
use espalier_engine::Model;

#[allow(
    dead_code,
    reason = "each test binary uses a part of the shared helpers"
)]
mod common;
use common::app;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn examples() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_pipeline_parses_and_plans() {
    // The examples' relative paths (data/, out/) are relative to the repository root, as when
    // a user runs them from there. The other test here uses absolute paths only, so changing
    // the working directory affects nothing else.
    std::env::set_current_dir(repo()).unwrap();
    let files = examples();
    assert!(files.len() >= 10, "{files:?}");
    let mut shapes: Option<Model> = None;
    for path in &files {
        let shown = path.display();
        let pipeline = Pipeline::load(path).unwrap_or_else(|e| panic!("{e}"));
        let stages = pipeline.stages.len();
        let reference = pipeline.model.value.clone();
        let model = if reference.starts_with("fetch:smollm2") {
            shapes.get_or_insert_with(|| {
                espalier_engine::load_model("builtin:smollm2-135m-shapes").unwrap()
            })
        } else if reference.starts_with("builtin:") {
            &espalier_engine::load_model(&reference).unwrap()
        } else {
            panic!("{shown}: names `{reference}`, which tests cannot load");
        };
        let plan = espalier::plan::plan(pipeline, &app().registry(), &app().runtime, model)
            .unwrap_or_else(|e| panic!("{shown}: {e}"));
        assert_eq!(plan.stages.len(), stages, "{shown}");
        for stage in &plan.stages {
            assert!(
                !stage.targets.is_empty(),
                "{shown}: stage `{}` targets nothing",
                stage.spec.name
            );
        }
    }
}

#[test]
fn the_readme_lists_exactly_the_examples() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let files: Vec<String> = examples()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for f in &files {
        assert!(
            readme.contains(&format!("`{f}`")) || readme.contains(&format!("pipelines/{f}")),
            "README.md does not mention pipelines/{f}"
        );
    }
    // Every `NAME.toml` the README names exists (in pipelines/, or at the root such as
    // rust-toolchain.toml).
    let token_char = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
    for (at, _) in readme.match_indices(".toml") {
        // The byte after the last character that cannot be part of a path (which may be
        // several bytes long, such as `…`).
        let start = readme[..at]
            .char_indices()
            .rev()
            .find(|&(_, c)| !token_char(c))
            .map_or(0, |(i, c)| i + c.len_utf8());
        let token = &readme[start..at + ".toml".len()];
        let name = token.trim_start_matches("pipelines/");
        // `pipeline.toml` is the pipeline's name inside a packed strategy (strategy.rs).
        let archive_member = token == "pipeline.toml";
        // A file a README walkthrough writes itself (`... > team-b/wanda-oci.toml`).
        let written = readme.contains(&format!("> {token}"));
        assert!(
            archive_member
                || written
                || files.iter().any(|f| f == name)
                || repo().join(token).is_file(),
            "README.md names `{token}`, which does not exist"
        );
    }
}
