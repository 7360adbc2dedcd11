//! Helpers shared by the library-level integration tests: one plugin runtime per test binary,
//! a way to run pipeline text without exporting, and the reference selection the criteria are
//! checked against.

use std::sync::OnceLock;

use espalier::app::{App, AppError, RunOverrides, RunResult};
use espalier::cancel::CancelToken;
use espalier::events::Quiet;
use espalier::pipeline::Pipeline;
use espalier_engine::Model;

/// The runtime with the built-in plugins, started once per test binary (compiling the
/// components is the expensive part).
pub fn app() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| App::new(&[]).expect("runtime and built-in plugins load"))
}

/// Runs pipeline text (named `test.toml` in errors) without exporting.
pub fn run(text: &str) -> Result<RunResult, AppError> {
    let pipeline = Pipeline::parse("test.toml", text)?;
    app().run_pipeline(
        pipeline,
        &RunOverrides {
            no_export: true,
            ..Default::default()
        },
        &mut Quiet,
        &CancelToken::new(),
    )
}

/// Reference top-k: sort indices by score descending, ties to the lower index.
pub fn top_k<T: PartialOrd + Copy>(scores: &[T], k: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    let mut keep = vec![false; scores.len()];
    for &i in order.iter().take(k) {
        keep[i] = true;
    }
    keep
}

/// The keep-flags a run left on `name`.
pub fn mask_of(result: &RunResult, name: &str) -> Vec<bool> {
    result
        .state
        .masks
        .get(name)
        .unwrap_or_else(|| panic!("no mask for {name}"))
        .keep()
        .to_vec()
}

/// Names of every linear inside the transformer blocks (the default targets).
pub fn block_linears(model: &Model) -> Vec<String> {
    model
        .layers()
        .into_iter()
        .filter(|l| l.role.is_block_linear())
        .map(|l| l.name)
        .collect()
}
