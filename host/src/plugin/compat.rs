//! Conversions between the 0.1.0 WIT types and the 0.2.0 ones the host works with. Only the
//! values crossing a 0.1 plugin's `describe` / `apply` boundary need them (the imports are
//! implemented for both versions by one macro in `state.rs`); resources (`tensor`, `mask`) map
//! to the same host types in both versions and move across unchanged.

use super::bindings::v0_1::espalier::prune::{model as m1, plugin_types as p1};
use super::bindings::v0_1::{PluginInfo as PluginInfo1, StageContext as Ctx1, StageOutput as Out1};
use super::bindings::v0_2::espalier::prune::{model as m2, plugin_types as p2};
use super::bindings::v0_2::{PluginInfo, StageContext, StageOutput};

/// A 0.1 role as 0.2 (identical cases).
pub fn role_to_v1(r: m2::Role) -> m1::Role {
    use m1::Role as A;
    use m2::Role as B;
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

/// A layer description for a 0.1 plugin.
pub fn layer_to_v1(l: &m2::LayerInfo) -> m1::LayerInfo {
    m1::LayerInfo {
        name: l.name.clone(),
        role: role_to_v1(l.role),
        block: l.block,
        shape: l.shape.clone(),
        heads: l.heads,
        kv_heads: l.kv_heads,
        head_dim: l.head_dim,
    }
}

/// Model facts for a 0.1 plugin.
pub fn model_info_to_v1(i: &m2::ModelInfo) -> m1::ModelInfo {
    m1::ModelInfo {
        architecture: i.architecture.clone(),
        hidden_size: i.hidden_size,
        num_layers: i.num_layers,
        num_heads: i.num_heads,
        num_kv_heads: i.num_kv_heads,
        head_dim: i.head_dim,
        vocab_size: i.vocab_size,
    }
}

fn value_to_v1(v: &p2::ParamValue) -> p1::ParamValue {
    match v {
        p2::ParamValue::Boolean(b) => p1::ParamValue::Boolean(*b),
        p2::ParamValue::Integer(i) => p1::ParamValue::Integer(*i),
        p2::ParamValue::Float(f) => p1::ParamValue::Float(*f),
        p2::ParamValue::Text(t) => p1::ParamValue::Text(t.clone()),
        p2::ParamValue::Integers(l) => p1::ParamValue::Integers(l.clone()),
        p2::ParamValue::Floats(l) => p1::ParamValue::Floats(l.clone()),
    }
}

fn value_from_v1(v: p1::ParamValue) -> p2::ParamValue {
    match v {
        p1::ParamValue::Boolean(b) => p2::ParamValue::Boolean(b),
        p1::ParamValue::Integer(i) => p2::ParamValue::Integer(i),
        p1::ParamValue::Float(f) => p2::ParamValue::Float(f),
        p1::ParamValue::Text(t) => p2::ParamValue::Text(t),
        p1::ParamValue::Integers(l) => p2::ParamValue::Integers(l),
        p1::ParamValue::Floats(l) => p2::ParamValue::Floats(l),
    }
}

fn kind_from_v1(k: p1::ParamKind) -> p2::ParamKind {
    match k {
        p1::ParamKind::Boolean => p2::ParamKind::Boolean,
        p1::ParamKind::Integer => p2::ParamKind::Integer,
        p1::ParamKind::Float => p2::ParamKind::Float,
        p1::ParamKind::Text => p2::ParamKind::Text,
        p1::ParamKind::Integers => p2::ParamKind::Integers,
        p1::ParamKind::Floats => p2::ParamKind::Floats,
    }
}

fn output_kind_from_v1(k: p1::OutputKind) -> p2::OutputKind {
    match k {
        p1::OutputKind::Masks => p2::OutputKind::Masks,
        p1::OutputKind::Budgets => p2::OutputKind::Budgets,
        p1::OutputKind::Heads => p2::OutputKind::Heads,
    }
}

/// What a 0.1 plugin described, in 0.2 terms (0.1 knows only the `weights` need).
pub fn plugin_info_from_v1(i: PluginInfo1) -> PluginInfo {
    PluginInfo {
        name: i.name,
        version: i.version,
        description: i.description,
        params: i
            .params
            .into_iter()
            .map(|p| p2::ParamSpec {
                name: p.name,
                kind: kind_from_v1(p.kind),
                default: p.default.map(value_from_v1),
                doc: p.doc,
            })
            .collect(),
        needs: i
            .needs
            .into_iter()
            .map(|n| match n {
                p1::Need::Weights => p2::Need::Weights,
            })
            .collect(),
        produces: output_kind_from_v1(i.produces),
    }
}

/// A stage context for a 0.1 plugin.
pub fn stage_context_to_v1(c: &StageContext) -> Ctx1 {
    Ctx1 {
        stage: c.stage.clone(),
        targets: c
            .targets
            .iter()
            .map(|t| p1::Target {
                layer: layer_to_v1(&t.layer),
                density: t.density,
            })
            .collect(),
        params: c
            .params
            .iter()
            .map(|(k, v)| (k.clone(), value_to_v1(v)))
            .collect(),
    }
}

/// A 0.1 plugin's output in 0.2 terms (mask handles move unchanged).
pub fn stage_output_from_v1(o: Out1) -> StageOutput {
    StageOutput {
        masks: o
            .masks
            .into_iter()
            .map(|m| p2::LayerMask {
                layer: m.layer,
                mask: m.mask,
            })
            .collect(),
        budgets: o
            .budgets
            .into_iter()
            .map(|b| p2::LayerBudget {
                layer: b.layer,
                density: b.density,
            })
            .collect(),
        heads: o
            .heads
            .into_iter()
            .map(|h| p2::HeadKeep {
                block: h.block,
                keep: h.keep,
            })
            .collect(),
    }
}
