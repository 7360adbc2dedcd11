//! Layer introspection: what each named weight of a model *is* (its role, its transformer
//! block, its head layout), derived from the tensor name and the config.
//!
//! Every linear weight is described in one canonical orientation, `[out_features,
//! in_features]` (PyTorch `nn.Linear`), whatever the checkpoint stores: GPT-2's `Conv1D`
//! weights are transposed on load (see [`crate::model`]). Plugins and masks therefore see one
//! convention ("N:M = N of every M consecutive *input* weights of a row").

use crate::config::{Architecture, ModelConfig};

/// What a weight does in the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Token embedding (also the LM head when tied).
    Embedding,
    /// Learned position embedding (GPT-2).
    PositionEmbedding,
    /// Query projection.
    AttnQ,
    /// Key projection.
    AttnK,
    /// Value projection.
    AttnV,
    /// Fused query/key/value projection (GPT-2 `c_attn`): rows are q, then k, then v.
    AttnQkv,
    /// Attention output projection.
    AttnO,
    /// Gate projection of a SwiGLU MLP.
    MlpGate,
    /// Up projection of a SwiGLU MLP, or GPT-2's `c_fc`.
    MlpUp,
    /// Down projection of an MLP (GPT-2's `mlp.c_proj`).
    MlpDown,
    /// Separate LM head.
    LmHead,
    /// Normalisation weight or bias.
    Norm,
    /// A bias vector of a linear layer.
    Bias,
    /// Anything else the checkpoint carries (kept as is).
    Other,
}

impl Role {
    /// True for the 2-D weights of linear layers inside transformer blocks (the usual targets).
    pub fn is_block_linear(self) -> bool {
        matches!(
            self,
            Role::AttnQ
                | Role::AttnK
                | Role::AttnV
                | Role::AttnQkv
                | Role::AttnO
                | Role::MlpGate
                | Role::MlpUp
                | Role::MlpDown
        )
    }

    /// Stable lower-case name used in reports and the WIT interface.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Embedding => "embedding",
            Role::PositionEmbedding => "position-embedding",
            Role::AttnQ => "attn-q",
            Role::AttnK => "attn-k",
            Role::AttnV => "attn-v",
            Role::AttnQkv => "attn-qkv",
            Role::AttnO => "attn-o",
            Role::MlpGate => "mlp-gate",
            Role::MlpUp => "mlp-up",
            Role::MlpDown => "mlp-down",
            Role::LmHead => "lm-head",
            Role::Norm => "norm",
            Role::Bias => "bias",
            Role::Other => "other",
        }
    }
}

/// One named weight of the model as plugins and reports see it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerInfo {
    /// Tensor name as in the checkpoint (e.g. `model.layers.3.mlp.up_proj.weight`).
    pub name: String,
    /// What the weight does.
    pub role: Role,
    /// Transformer block index, for weights inside a block.
    pub block: Option<usize>,
    /// Shape in canonical orientation (`[out, in]` for linears).
    pub shape: Vec<usize>,
    /// Query heads, for attention projections.
    pub heads: Option<usize>,
    /// Key/value heads, for attention projections.
    pub kv_heads: Option<usize>,
    /// Width of one head, for attention projections.
    pub head_dim: Option<usize>,
}

impl LayerInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Extracts the block index from names like `model.layers.7.` or `h.7.`.
pub(crate) fn block_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| match w[0] {
        "layers" | "h" => w[1].parse().ok(),
        _ => None,
    })
}

/// Classifies one tensor name.
pub fn role_of(name: &str, arch: Architecture) -> Role {
    let is_bias = name.ends_with(".bias");
    let role = match arch {
        Architecture::Llama => {
            if name.ends_with("embed_tokens.weight") {
                Role::Embedding
            } else if name.contains("self_attn.q_proj") {
                Role::AttnQ
            } else if name.contains("self_attn.k_proj") {
                Role::AttnK
            } else if name.contains("self_attn.v_proj") {
                Role::AttnV
            } else if name.contains("self_attn.o_proj") {
                Role::AttnO
            } else if name.contains("mlp.gate_proj") {
                Role::MlpGate
            } else if name.contains("mlp.up_proj") {
                Role::MlpUp
            } else if name.contains("mlp.down_proj") {
                Role::MlpDown
            } else if name.starts_with("lm_head") {
                Role::LmHead
            } else if name.contains("norm") {
                Role::Norm
            } else {
                Role::Other
            }
        }
        Architecture::Gpt2 => {
            if name.ends_with("wte.weight") {
                Role::Embedding
            } else if name.ends_with("wpe.weight") {
                Role::PositionEmbedding
            } else if name.contains("attn.c_attn") {
                Role::AttnQkv
            } else if name.contains("attn.c_proj") {
                Role::AttnO
            } else if name.contains("mlp.c_fc") {
                Role::MlpUp
            } else if name.contains("mlp.c_proj") {
                Role::MlpDown
            } else if name.starts_with("lm_head") {
                Role::LmHead
            } else if name.contains("ln_") {
                Role::Norm
            } else {
                Role::Other
            }
        }
    };
    if is_bias && role != Role::Norm && role != Role::Other {
        Role::Bias
    } else {
        role
    }
}

/// Describes one tensor of a model with the given config.
pub fn describe(name: &str, shape: &[usize], config: &ModelConfig) -> LayerInfo {
    let role = role_of(name, config.arch);
    let attention = matches!(
        role,
        Role::AttnQ | Role::AttnK | Role::AttnV | Role::AttnQkv | Role::AttnO
    );
    LayerInfo {
        name: name.to_string(),
        role,
        block: block_index(name),
        shape: shape.to_vec(),
        heads: attention.then_some(config.num_heads),
        kv_heads: attention.then_some(config.num_kv_heads),
        head_dim: attention.then_some(config.head_dim),
    }
}

/// Whether a checkpoint stores this weight transposed (`[in, out]`, GPT-2 `Conv1D`).
pub fn stored_transposed(name: &str, arch: Architecture) -> bool {
    arch == Architecture::Gpt2
        && name.ends_with(".weight")
        && matches!(
            role_of(name, arch),
            Role::AttnQkv | Role::AttnO | Role::MlpUp | Role::MlpDown
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_names_classify() {
        let a = Architecture::Llama;
        assert_eq!(
            role_of("model.layers.0.self_attn.q_proj.weight", a),
            Role::AttnQ
        );
        assert_eq!(
            role_of("model.layers.0.self_attn.q_proj.bias", a),
            Role::Bias
        );
        assert_eq!(
            role_of("model.layers.0.mlp.down_proj.weight", a),
            Role::MlpDown
        );
        assert_eq!(
            role_of("model.layers.0.input_layernorm.weight", a),
            Role::Norm
        );
        assert_eq!(role_of("model.embed_tokens.weight", a), Role::Embedding);
        assert_eq!(role_of("lm_head.weight", a), Role::LmHead);
        assert_eq!(block_index("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(block_index("model.norm.weight"), None);
    }

    #[test]
    fn gpt2_names_classify_and_transpose() {
        let a = Architecture::Gpt2;
        assert_eq!(role_of("h.1.attn.c_attn.weight", a), Role::AttnQkv);
        assert_eq!(
            role_of("transformer.h.1.mlp.c_proj.weight", a),
            Role::MlpDown
        );
        assert_eq!(role_of("h.1.attn.c_proj.weight", a), Role::AttnO);
        assert_eq!(role_of("h.1.ln_1.bias", a), Role::Norm);
        assert_eq!(role_of("h.1.mlp.c_fc.bias", a), Role::Bias);
        assert!(stored_transposed("h.1.mlp.c_fc.weight", a));
        assert!(!stored_transposed("h.1.mlp.c_fc.bias", a));
        assert!(!stored_transposed("wte.weight", a));
        assert_eq!(block_index("transformer.h.3.attn.c_attn.weight"), Some(3));
    }
}
