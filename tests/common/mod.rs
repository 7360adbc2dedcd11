//! Helpers shared by the library-level integration tests: one plugin runtime per test binary
//! and a way to run pipeline text without exporting.

use std::sync::OnceLock;

use espalier::app::{App, AppError, RunOverrides, RunResult};
use espalier::pipeline::Pipeline;
use espalier::run::Quiet;

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
    )
}
