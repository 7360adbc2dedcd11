//! Plugins: WIT bindings (one module per released WIT version), the sandboxed wasmtime
//! runtime, per-Store state, and the registry of built-in and user-supplied criteria.

pub mod bindings;
pub mod compat;
pub mod registry;
pub mod runtime;
pub mod state;

pub use registry::{Origin, Plugin, Registry};
pub use runtime::{CallTimings, CompiledPlugin, PluginError, Runtime, Sandbox, WitVersion};
