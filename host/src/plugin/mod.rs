//! Plugins: WIT bindings (one module per released WIT version), the sandboxed wasmtime
//! runtime, per-Store state, and the registry of built-in and user-supplied criteria.

pub mod bindings;
pub mod budget;
pub mod compat;
pub mod oci;
pub mod progress;
pub mod registry;
/// The host-import replay harness: unit tests and the `host_imports` fuzz target.
#[cfg(any(test, feature = "fuzzing"))]
pub mod replay;
pub mod runtime;
pub mod signing;
pub mod state;

pub use progress::Progress;
pub use registry::{Origin, Plugin, Registry};
pub use runtime::{CallTimings, CompiledPlugin, PluginError, Runtime, Sandbox, WitVersion};
