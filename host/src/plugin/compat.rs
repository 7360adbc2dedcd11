//! Conversions between the older WIT versions (0.1.0 to 0.5.0) and the 0.6.0 types the host
//! works with. Only the values crossing an older plugin's `describe` / `apply` boundary need them, plus
//! the model descriptions its `model` imports return (the imports themselves are implemented for
//! every version by one macro in `state.rs`); resources (`tensor`, `mask`) map to the same host
//! types in all versions and move across unchanged.
//!
//! The versions' generated types are distinct Rust items of identical shape (except the `need`
//! enum, which grows), so one macro writes each version's conversions. What 0.4 added (the
//! `validate` export, the `progress` import) has no counterpart before it: a plugin older than
//! 0.4 is simply not validated by a call and cannot report progress; [`v4`] also converts the
//! planning values. What 0.5 added (the `obs` import, the `weights` output) has no older
//! counterpart: an older plugin never returns weights. What 0.6 added (the `training` import,
//! the `update-masks` export, the `mask-updates` output) has no older counterpart either: an
//! older plugin is never asked to update masks during fine-tuning.

use super::bindings::v0_6::espalier::prune::{model as mh, plugin_types as ph};
use super::bindings::v0_6::{PluginInfo, StageContext, StageOutput};

/// The updated weights of a version without them (before 0.5): none.
fn no_weights<T>(_: &mut T) -> Vec<ph::LayerWeights> {
    Vec::new()
}

/// The updated weights a 0.5 plugin returned (handles move unchanged).
fn v5_weights(o: &mut super::bindings::v0_5::StageOutput) -> Vec<ph::LayerWeights> {
    std::mem::take(&mut o.weights)
        .into_iter()
        .map(|w| ph::LayerWeights {
            layer: w.layer,
            weights: w.weights,
        })
        .collect()
}

macro_rules! older_version {
    ($module:ident, $v:ident,
     needs: { $($old_need:ident => $new_need:ident),* $(,)? },
     outputs: { $($old_out:ident => $new_out:ident),* $(,)? },
     weights: $weights:path) => {
        /// Conversions for plugins built against this older version.
        pub mod $module {
            use super::*;
            use crate::plugin::bindings::$v::espalier::prune::{model as mo, plugin_types as po};
            use crate::plugin::bindings::$v::{
                PluginInfo as InfoO, StageContext as CtxO, StageOutput as OutO,
            };

            /// A role in this version's terms (identical cases).
            pub fn role(r: mh::Role) -> mo::Role {
                use mh::Role as B;
                use mo::Role as A;
                match r {
                    B::Embedding => A::Embedding,
                    B::PositionEmbedding => A::PositionEmbedding,
                    B::AttnQ => A::AttnQ,
                    B::AttnK => A::AttnK,
                    B::AttnV => A::AttnV,
                    B::AttnQkv => A::AttnQkv,
                    B::AttnO => A::AttnO,
                    B::MlpGate => A::MlpGate,
                    B::MlpUp => A::MlpUp,
                    B::MlpDown => A::MlpDown,
                    B::LmHead => A::LmHead,
                    B::Norm => A::Norm,
                    B::Bias => A::Bias,
                    B::Other => A::Other,
                }
            }

            /// A layer description in this version's terms.
            pub fn layer(l: &mh::LayerInfo) -> mo::LayerInfo {
                mo::LayerInfo {
                    name: l.name.clone(),
                    role: role(l.role),
                    block: l.block,
                    shape: l.shape.clone(),
                    heads: l.heads,
                    kv_heads: l.kv_heads,
                    head_dim: l.head_dim,
                }
            }

            /// Model facts in this version's terms.
            pub fn model_info(i: &mh::ModelInfo) -> mo::ModelInfo {
                mo::ModelInfo {
                    architecture: i.architecture.clone(),
                    hidden_size: i.hidden_size,
                    num_layers: i.num_layers,
                    num_heads: i.num_heads,
                    num_kv_heads: i.num_kv_heads,
                    head_dim: i.head_dim,
                    vocab_size: i.vocab_size,
                }
            }

            pub(crate) fn value_to(v: &ph::ParamValue) -> po::ParamValue {
                match v {
                    ph::ParamValue::Boolean(b) => po::ParamValue::Boolean(*b),
                    ph::ParamValue::Integer(i) => po::ParamValue::Integer(*i),
                    ph::ParamValue::Float(f) => po::ParamValue::Float(*f),
                    ph::ParamValue::Text(t) => po::ParamValue::Text(t.clone()),
                    ph::ParamValue::Integers(l) => po::ParamValue::Integers(l.clone()),
                    ph::ParamValue::Floats(l) => po::ParamValue::Floats(l.clone()),
                }
            }

            fn value_from(v: po::ParamValue) -> ph::ParamValue {
                match v {
                    po::ParamValue::Boolean(b) => ph::ParamValue::Boolean(b),
                    po::ParamValue::Integer(i) => ph::ParamValue::Integer(i),
                    po::ParamValue::Float(f) => ph::ParamValue::Float(f),
                    po::ParamValue::Text(t) => ph::ParamValue::Text(t),
                    po::ParamValue::Integers(l) => ph::ParamValue::Integers(l),
                    po::ParamValue::Floats(l) => ph::ParamValue::Floats(l),
                }
            }

            fn kind_from(k: po::ParamKind) -> ph::ParamKind {
                match k {
                    po::ParamKind::Boolean => ph::ParamKind::Boolean,
                    po::ParamKind::Integer => ph::ParamKind::Integer,
                    po::ParamKind::Float => ph::ParamKind::Float,
                    po::ParamKind::Text => ph::ParamKind::Text,
                    po::ParamKind::Integers => ph::ParamKind::Integers,
                    po::ParamKind::Floats => ph::ParamKind::Floats,
                }
            }

            fn output_kind_from(k: po::OutputKind) -> ph::OutputKind {
                match k {
                    $(po::OutputKind::$old_out => ph::OutputKind::$new_out,)*
                }
            }

            /// What the plugin described, in 0.6 terms.
            pub fn plugin_info_from(i: InfoO) -> PluginInfo {
                PluginInfo {
                    name: i.name,
                    version: i.version,
                    description: i.description,
                    params: i
                        .params
                        .into_iter()
                        .map(|p| ph::ParamSpec {
                            name: p.name,
                            kind: kind_from(p.kind),
                            default: p.default.map(value_from),
                            doc: p.doc,
                        })
                        .collect(),
                    needs: i
                        .needs
                        .into_iter()
                        .map(|n| match n {
                            $(po::Need::$old_need => ph::Need::$new_need,)*
                        })
                        .collect(),
                    produces: output_kind_from(i.produces),
                }
            }

            /// A stage context in this version's terms.
            pub fn stage_context_to(c: &StageContext) -> CtxO {
                CtxO {
                    stage: c.stage.clone(),
                    targets: c
                        .targets
                        .iter()
                        .map(|t| po::Target {
                            layer: layer(&t.layer),
                            density: t.density,
                        })
                        .collect(),
                    params: c.params.iter().map(|(k, v)| (k.clone(), value_to(v))).collect(),
                }
            }

            /// The plugin's output in 0.6 terms (mask and weight handles move unchanged).
            pub fn stage_output_from(mut o: OutO) -> StageOutput {
                let weights = $weights(&mut o);
                StageOutput {
                    masks: o
                        .masks
                        .into_iter()
                        .map(|m| ph::LayerMask {
                            layer: m.layer,
                            mask: m.mask,
                        })
                        .collect(),
                    budgets: o
                        .budgets
                        .into_iter()
                        .map(|b| ph::LayerBudget {
                            layer: b.layer,
                            density: b.density,
                        })
                        .collect(),
                    heads: o
                        .heads
                        .into_iter()
                        .map(|h| ph::HeadKeep {
                            block: h.block,
                            keep: h.keep,
                        })
                        .collect(),
                    weights,
                }
            }
        }
    };
}

older_version!(v1, v0_1,
    needs: { Weights => Weights },
    outputs: { Masks => Masks, Budgets => Budgets, Heads => Heads },
    weights: no_weights);
older_version!(v2, v0_2,
    needs: { Weights => Weights, Activations => Activations, Loss => Loss },
    outputs: { Masks => Masks, Budgets => Budgets, Heads => Heads },
    weights: no_weights);
older_version!(v3, v0_3,
    needs: {
        Weights => Weights,
        Activations => Activations,
        Loss => Loss,
        Gradients => Gradients,
    },
    outputs: { Masks => Masks, Budgets => Budgets, Heads => Heads },
    weights: no_weights);
older_version!(v4, v0_4,
    needs: {
        Weights => Weights,
        Activations => Activations,
        Loss => Loss,
        Gradients => Gradients,
    },
    outputs: { Masks => Masks, Budgets => Budgets, Heads => Heads },
    weights: no_weights);
older_version!(v5, v0_5,
    needs: {
        Weights => Weights,
        Activations => Activations,
        Loss => Loss,
        Gradients => Gradients,
        Hessians => Hessians,
    },
    outputs: { Masks => Masks, Budgets => Budgets, Heads => Heads, Weights => Weights },
    weights: v5_weights);

/// The planning values of `validate`, which 0.4 introduced (0.5 added `masked-earlier`).
pub mod v4_planning {
    use super::ph;
    use crate::plugin::bindings::v0_4::PlanningContext as CtxO;
    use crate::plugin::bindings::v0_4::espalier::prune::plugin_types as po;
    use crate::plugin::bindings::v0_6::PlanningContext;

    /// A planning context in 0.4 terms.
    pub fn planning_context_to(c: &PlanningContext) -> CtxO {
        CtxO {
            stage: c.stage.clone(),
            density: match c.density {
                ph::PlannedDensity::Unset => po::PlannedDensity::Unset,
                ph::PlannedDensity::Fixed(d) => po::PlannedDensity::Fixed(d),
                ph::PlannedDensity::Budget => po::PlannedDensity::Budget,
            },
            targets: c.targets.iter().map(super::v4::layer).collect(),
            params: c
                .params
                .iter()
                .map(|(k, v)| (k.clone(), super::v4::value_to(v)))
                .collect(),
        }
    }

    /// The problems a 0.4 plugin found, in 0.6 terms.
    pub fn problems_from(p: Vec<po::ParamProblem>) -> Vec<ph::ParamProblem> {
        p.into_iter()
            .map(|p| ph::ParamProblem {
                at: match p.at {
                    po::ProblemAt::Stage => ph::ProblemAt::Stage,
                    po::ProblemAt::Density => ph::ProblemAt::Density,
                    po::ProblemAt::Targets => ph::ProblemAt::Targets,
                    po::ProblemAt::Param(n) => ph::ProblemAt::Param(n),
                },
                message: p.message,
            })
            .collect()
    }
}

/// The planning values of `validate` for a 0.5 plugin (0.6 kept them unchanged).
pub mod v5_planning {
    use super::ph;
    use crate::plugin::bindings::v0_5::PlanningContext as CtxO;
    use crate::plugin::bindings::v0_5::espalier::prune::plugin_types as po;
    use crate::plugin::bindings::v0_6::PlanningContext;

    /// A planning context in 0.5 terms.
    pub fn planning_context_to(c: &PlanningContext) -> CtxO {
        CtxO {
            stage: c.stage.clone(),
            density: match c.density {
                ph::PlannedDensity::Unset => po::PlannedDensity::Unset,
                ph::PlannedDensity::Fixed(d) => po::PlannedDensity::Fixed(d),
                ph::PlannedDensity::Budget => po::PlannedDensity::Budget,
            },
            targets: c.targets.iter().map(super::v5::layer).collect(),
            params: c
                .params
                .iter()
                .map(|(k, v)| (k.clone(), super::v5::value_to(v)))
                .collect(),
            masked_earlier: c.masked_earlier.clone(),
        }
    }

    /// The problems a 0.5 plugin found, in 0.6 terms.
    pub fn problems_from(p: Vec<po::ParamProblem>) -> Vec<ph::ParamProblem> {
        p.into_iter()
            .map(|p| ph::ParamProblem {
                at: match p.at {
                    po::ProblemAt::Stage => ph::ProblemAt::Stage,
                    po::ProblemAt::Density => ph::ProblemAt::Density,
                    po::ProblemAt::Targets => ph::ProblemAt::Targets,
                    po::ProblemAt::Param(n) => ph::ProblemAt::Param(n),
                },
                message: p.message,
            })
            .collect()
    }
}
