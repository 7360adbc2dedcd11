//! Host bindings generated from `wit/since_v0.1.0` (package `espalier:prune@0.1.0`).
//!
//! One module per released WIT version: when 0.2.0 lands it gets its own module, and the
//! runtime dispatches on the version a plugin was built against (see ARCHITECTURE.md).

wasmtime::component::bindgen!({
    path: "../wit/since_v0.1.0",
    world: "criterion",
    // Every import returns `wasmtime::Result` so the host can trap a misbehaving guest
    // (dead handles) instead of panicking; WIT-level failures are `result<_, string>`.
    imports: { default: trappable },
    with: {
        "espalier:prune/tensors.tensor": crate::plugin::state::TensorHandle,
        "espalier:prune/kernels.mask": crate::mask::Mask,
    },
});

pub use self::espalier::prune::kernels::{BlockShape, NOfM, Structure};
pub use self::espalier::prune::model::{LayerInfo as WitLayerInfo, Role as WitRole};
// `plugin-info`, `stage-context` and `stage-output` are already at this module's root (the
// world `use`s them).
pub use self::espalier::prune::plugin_types::{
    HeadKeep, LayerBudget, LayerMask, Need, OutputKind, ParamKind, ParamSpec, ParamValue, Target,
};
