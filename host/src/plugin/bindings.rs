//! Host bindings generated from the released WIT packages, one module per version:
//! [`v0_6`] (`wit/since_v0.6.0`, `espalier:prune@0.6.0`), [`v0_5`], [`v0_4`], [`v0_3`], [`v0_2`]
//! and [`v0_1`] (frozen). The rest of the host speaks 0.6 (a superset of them all): this module
//! re-exports the 0.6 types at its root, and `compat.rs` converts the few older values that cross the
//! `describe` / `apply` boundary. The runtime picks the world from the version a component
//! imports.

/// `espalier:prune@0.6.0`: 0.5.0 plus the `training` interface and the `update-masks` export
/// (dynamic sparsity during fine-tuning), the `mask-updates` output kind and
/// `kernels.mask-bytes`.
pub mod v0_6 {
    wasmtime::component::bindgen!({
        path: "../wit/since_v0.6.0",
        world: "criterion",
        // Every import returns `wasmtime::Result` so the host can trap a misbehaving guest
        // (dead handles) instead of panicking; WIT-level failures are `result<_, string>`.
        imports: { default: trappable },
        with: {
            "espalier:prune/tensors.tensor": crate::plugin::state::TensorHandle,
            "espalier:prune/kernels.mask": crate::mask::Mask,
            "espalier:prune/obs.hessian": crate::plugin::state::obs::HessianHandle,
            "espalier:prune/obs.update": crate::plugin::state::obs::UpdateHandle,
        },
    });
}

/// `espalier:prune@0.5.0`: 0.4.0 plus the `obs` interface (Hessian handles and OBS update
/// kernels), the `hessians` need and the `weights` output kind. Still served, frozen.
pub mod v0_5 {
    wasmtime::component::bindgen!({
        path: "../wit/since_v0.5.0",
        world: "criterion",
        imports: { default: trappable },
        with: {
            "espalier:prune/tensors.tensor": crate::plugin::state::TensorHandle,
            "espalier:prune/kernels.mask": crate::mask::Mask,
            "espalier:prune/obs.hessian": crate::plugin::state::obs::HessianHandle,
            "espalier:prune/obs.update": crate::plugin::state::obs::UpdateHandle,
        },
    });
}

/// `espalier:prune@0.4.0`: 0.3.0 plus the `validate` export (planning-time checks) and the
/// `progress` import. Still served, frozen.
pub mod v0_4 {
    wasmtime::component::bindgen!({
        path: "../wit/since_v0.4.0",
        world: "criterion",
        imports: { default: trappable },
        with: {
            "espalier:prune/tensors.tensor": crate::plugin::state::TensorHandle,
            "espalier:prune/kernels.mask": crate::mask::Mask,
        },
    });
}

/// `espalier:prune@0.3.0`: 0.2.0 plus `calibration.gradients`, `calibration.loss-with-masks`
/// and the `gradients` need. Still served, frozen.
pub mod v0_3 {
    wasmtime::component::bindgen!({
        path: "../wit/since_v0.3.0",
        world: "criterion",
        imports: { default: trappable },
        with: {
            "espalier:prune/tensors.tensor": crate::plugin::state::TensorHandle,
            "espalier:prune/kernels.mask": crate::mask::Mask,
        },
    });
}

/// `espalier:prune@0.2.0`: 0.1.0 plus `calibration`, `kernels.select-per-row` and the
/// `activations` / `loss` needs. Still served, frozen.
pub mod v0_2 {
    wasmtime::component::bindgen!({
        path: "../wit/since_v0.2.0",
        world: "criterion",
        imports: { default: trappable },
        with: {
            "espalier:prune/tensors.tensor": crate::plugin::state::TensorHandle,
            "espalier:prune/kernels.mask": crate::mask::Mask,
        },
    });
}

/// `espalier:prune@0.1.0`, the first released contract: still served so that plugins built
/// against it keep running unchanged. Its resources map to the same host types as 0.6's.
pub mod v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/since_v0.1.0",
        world: "criterion",
        imports: { default: trappable },
        with: {
            "espalier:prune/tensors.tensor": crate::plugin::state::TensorHandle,
            "espalier:prune/kernels.mask": crate::mask::Mask,
        },
    });
}

// The host's vocabulary is the newest version.
pub use v0_6::espalier;
pub use v0_6::{Criterion, PlanningContext, PluginInfo, StageContext, StageOutput};

pub use self::espalier::prune::calibration::CalibrationInfo;
pub use self::espalier::prune::kernels::{BlockShape, NOfM, Structure};
pub use self::espalier::prune::model::{LayerInfo as WitLayerInfo, Role as WitRole};
pub use self::espalier::prune::plugin_types::{
    HeadKeep, LayerBudget, LayerMask, LayerWeights, Need, OutputKind, ParamKind, ParamProblem,
    ParamSpec, ParamValue, PlannedDensity, ProblemAt, Target,
};
pub use self::espalier::prune::training::{
    LayerState as WitLayerState, Position as UpdatePosition, UpdateContext,
};
