//! The one linear-layer abstraction of the forward pass.
//!
//! Every matrix product of a transformer block and the LM head goes through [`Linear`], so a
//! pruned model can swap the dense weight of one layer for another kernel (a sparse format,
//! N:M, a quantised layout) without the forward pass knowing. A [`Linear`] holds either a
//! dense candle tensor or any [`LinearKernel`] behind an `Arc`; the host wraps the kernels
//! crate's packed sparse formats in that trait.
//!
//! A dense layer runs on the kernels crate, on the tensor's own storage: decode steps (up to
//! [`espalier_kernels::SMALL_BATCH`] tokens, one per running sequence) stream the weights once
//! through its GEMV, split over the thread pool; prefill runs its AVX-512 GEMM (tokens in the
//! vector lanes, weights read in place) where the CPU has AVX-512, candle's GEMM elsewhere.
//! Measured on SmolLM2 with 2 threads, candle's matmul ran batch-1 products at about half the
//! memory bandwidth, and its prefill at 0.7-0.8x the kernels crate's end to end (`bench
//! decode`, 128 tokens).
//!
//! Convention: weights are `[out_features, in_features]` (PyTorch `nn.Linear`, the canonical
//! orientation of [`crate::model::Model`]); inputs are `[tokens, in_features]`, outputs
//! `[tokens, out_features]`, all f32 on the CPU.

use std::fmt;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::error::EngineError;

/// A replacement for the dense matrix product of one layer: `y = x · Wᵀ` (without bias; the
/// [`Linear`] adds it).
pub trait LinearKernel: fmt::Debug + Send + Sync {
    /// Width of the inputs.
    fn in_features(&self) -> usize;
    /// Width of the outputs.
    fn out_features(&self) -> usize;
    /// Computes `x · Wᵀ` for `x` of shape `[tokens, in_features]` (contiguous f32), returning
    /// `[tokens, out_features]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor, EngineError>;
    /// A short label for reports (`"csr"`, `"2:4"`, ...).
    fn kind(&self) -> &str;
    /// Bytes of weights (values, indices, scales) one product over a single token reads.
    fn weight_bytes(&self) -> usize;
    /// The packed weight behind the kernel, when it is one (what a packed checkpoint stores).
    fn packed(&self) -> Option<&espalier_kernels::PackedLinear> {
        None
    }
}

/// Where the weights of a [`Linear`] live.
#[derive(Clone)]
pub enum LinearWeight {
    /// A dense `[out, in]` f32 tensor (contiguous): the kernels crate's GEMV for decode steps,
    /// its GEMM or candle's matmul for prefill.
    Dense(Tensor),
    /// Any other implementation.
    Kernel(Arc<dyn LinearKernel>),
}

impl fmt::Debug for LinearWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinearWeight::Dense(w) => write!(f, "Dense({:?})", w.dims()),
            LinearWeight::Kernel(k) => write!(f, "Kernel({k:?})"),
        }
    }
}

/// One linear layer: `y = x · Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    name: String,
    weight: LinearWeight,
    /// The transposed view of a dense weight, made once: candle's matmul reads it through
    /// strides (gemm packs its operands anyway), so no transposed copy is ever materialised.
    weight_t: Option<Tensor>,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
}

fn shape_err(name: &str, message: String) -> EngineError {
    EngineError::Tensor {
        name: name.to_string(),
        message,
    }
}

impl Linear {
    /// A dense layer from an `[out, in]` weight and an optional `[out]` bias.
    pub fn dense(
        name: impl Into<String>,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> Result<Self, EngineError> {
        let name = name.into();
        let &[out_features, in_features] = weight.dims() else {
            return Err(shape_err(
                &name,
                format!(
                    "a linear weight must be 2-D [out, in], found {:?}",
                    weight.dims()
                ),
            ));
        };
        if weight.dtype() != DType::F32 {
            return Err(shape_err(
                &name,
                format!("expected f32, found {:?}", weight.dtype()),
            ));
        }
        // Row-major, so decode steps read each output's weights as one stream (a no-op for
        // every model loaded today).
        let weight = weight.contiguous()?;
        let weight_t = weight.t()?;
        Self::check_bias(&name, bias.as_ref(), out_features)?;
        Ok(Linear {
            name,
            weight: LinearWeight::Dense(weight),
            weight_t: Some(weight_t),
            bias,
            in_features,
            out_features,
        })
    }

    /// A layer computed by another kernel, with an optional `[out]` bias.
    pub fn with_kernel(
        name: impl Into<String>,
        kernel: Arc<dyn LinearKernel>,
        bias: Option<Tensor>,
    ) -> Result<Self, EngineError> {
        let name = name.into();
        let (in_features, out_features) = (kernel.in_features(), kernel.out_features());
        Self::check_bias(&name, bias.as_ref(), out_features)?;
        Ok(Linear {
            name,
            weight: LinearWeight::Kernel(kernel),
            weight_t: None,
            bias,
            in_features,
            out_features,
        })
    }

    fn check_bias(name: &str, bias: Option<&Tensor>, out: usize) -> Result<(), EngineError> {
        match bias {
            Some(b) if b.dims() != [out] => Err(shape_err(
                name,
                format!("bias has shape {:?}, expected [{out}]", b.dims()),
            )),
            _ => Ok(()),
        }
    }

    /// Replaces how the product is computed, keeping the name and bias. The new kernel must
    /// have the same shape.
    pub fn set_kernel(&mut self, kernel: Arc<dyn LinearKernel>) -> Result<(), EngineError> {
        if (kernel.in_features(), kernel.out_features()) != (self.in_features, self.out_features) {
            return Err(shape_err(
                &self.name,
                format!(
                    "kernel is {}x{} (out x in), the layer is {}x{}",
                    kernel.out_features(),
                    kernel.in_features(),
                    self.out_features,
                    self.in_features
                ),
            ));
        }
        self.weight = LinearWeight::Kernel(kernel);
        self.weight_t = None;
        Ok(())
    }

    /// The weight tensor's name in the model (e.g. `model.layers.0.mlp.up_proj.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Width of the inputs.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Width of the outputs.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// How the weights are held.
    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Bytes of weights one decode step reads from this layer (the bias excluded).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Kernel(k) => k.weight_bytes(),
        }
    }

    /// `"dense"` or the kernel's label.
    pub fn kind(&self) -> &str {
        match &self.weight {
            LinearWeight::Dense(_) => "dense",
            LinearWeight::Kernel(k) => k.kind(),
        }
    }

    /// Computes `x · Wᵀ + b` for `x` of shape `[tokens, in_features]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        match x.dims() {
            &[_, width] if width == self.in_features => {}
            dims => {
                return Err(shape_err(
                    &self.name,
                    format!(
                        "input has shape {dims:?}, expected [tokens, {}]",
                        self.in_features
                    ),
                ));
            }
        }
        let tokens = x.dims()[0];
        let y = match (&self.weight, &self.weight_t) {
            (LinearWeight::Dense(w), _)
                if tokens <= espalier_kernels::SMALL_BATCH
                    || espalier_kernels::gemm_f32_prefill_fast(espalier_kernels::Exec::auto()) =>
            {
                self.dense_on_kernels(w, x, tokens)?
            }
            (LinearWeight::Dense(_), Some(w_t)) => x.matmul(w_t)?,
            (LinearWeight::Dense(w), None) => x.matmul(&w.t()?)?,
            (LinearWeight::Kernel(k), _) => {
                let y = k.forward(x)?;
                if y.dims() != [x.dims()[0], self.out_features] {
                    return Err(shape_err(
                        &self.name,
                        format!(
                            "kernel `{}` returned shape {:?}, expected [{}, {}]",
                            k.kind(),
                            y.dims(),
                            x.dims()[0],
                            self.out_features
                        ),
                    ));
                }
                y
            }
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }
}

impl Linear {
    /// `x · Wᵀ` on the kernels crate: for a few tokens its small-batch GEMV (one pass over the
    /// weights, split over the pool), for prefill its AVX-512 GEMM.
    fn dense_on_kernels(
        &self,
        w: &Tensor,
        x: &Tensor,
        tokens: usize,
    ) -> Result<Tensor, EngineError> {
        // Not zeroed first where the kernel writes every output (prefill's GEMM).
        let y = crate::forward::with_f32(x, |xs| {
            crate::forward::with_f32(w, |ws| {
                espalier_kernels::gemm_f32_new(
                    ws,
                    self.out_features,
                    self.in_features,
                    xs,
                    tokens,
                    espalier_kernels::Exec::auto(),
                )
                .map_err(|e| shape_err(&self.name, e.to_string()))
            })
        })?;
        Ok(Tensor::from_vec(
            y,
            (tokens, self.out_features),
            x.device(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A kernel that multiplies by a dense weight by hand: stands in for a sparse kernel.
    #[derive(Debug)]
    struct Naive {
        w: Vec<f32>,
        out: usize,
        inp: usize,
    }

    impl LinearKernel for Naive {
        fn in_features(&self) -> usize {
            self.inp
        }
        fn out_features(&self) -> usize {
            self.out
        }
        fn forward(&self, x: &Tensor) -> Result<Tensor, EngineError> {
            let rows = x.dims()[0];
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let mut y = vec![0f32; rows * self.out];
            for r in 0..rows {
                for o in 0..self.out {
                    y[r * self.out + o] = (0..self.inp)
                        .map(|i| xs[r * self.inp + i] * self.w[o * self.inp + i])
                        .sum();
                }
            }
            Ok(Tensor::from_vec(y, (rows, self.out), &Device::Cpu)?)
        }
        fn kind(&self) -> &str {
            "naive"
        }
        fn weight_bytes(&self) -> usize {
            self.w.len() * 4
        }
    }

    #[test]
    fn dense_and_kernel_agree_and_bias_is_added() {
        let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let wt = Tensor::from_vec(w.clone(), (3, 4), &Device::Cpu).unwrap();
        let b = Tensor::new(&[1f32, -1.0, 0.5], &Device::Cpu).unwrap();
        let x = Tensor::from_vec((0..8).map(|i| i as f32).collect(), (2, 4), &Device::Cpu).unwrap();
        let mut lin = Linear::dense("l.weight", wt, Some(b)).unwrap();
        let dense: Vec<Vec<f32>> = lin.forward(&x).unwrap().to_vec2().unwrap();
        // Row 0: x = [0,1,2,3], w row 0 = [-2,-1.5,-1,-0.5] → -1.5-2-1.5 = -5, +1 bias.
        assert_eq!(dense[0][0], -4.0);
        lin.set_kernel(Arc::new(Naive { w, out: 3, inp: 4 }))
            .unwrap();
        assert_eq!(lin.kind(), "naive");
        let sparse: Vec<Vec<f32>> = lin.forward(&x).unwrap().to_vec2().unwrap();
        assert_eq!(dense, sparse);
        let bad = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(
            lin.forward(&bad)
                .unwrap_err()
                .to_string()
                .contains("l.weight")
        );
        let wrong = Naive {
            w: vec![],
            out: 2,
            inp: 4,
        };
        assert!(lin.set_kernel(Arc::new(wrong)).is_err());
    }
}
