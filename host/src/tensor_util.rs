//! Zero-copy access to the f32 data of candle CPU tensors, for host kernels that work on slices.

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

/// Runs `f` on the tensor's contiguous f32 data (copying only when the tensor is a strided
/// view or another dtype).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, String> {
    let t = if t.is_contiguous() && t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)
            .and_then(|t| t.contiguous())
            .map_err(|e| e.to_string())?
    };
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => {
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| "tensor is not contiguous".to_string())?;
            Ok(f(&v[start..end]))
        }
        _ => Err("tensor is not an f32 CPU tensor".into()),
    }
}

/// Builds an f32 CPU tensor from owned data (no copy). The shape is checked first: candle
/// multiplies its dimensions without overflow checks when it computes strides.
pub fn tensor_from(data: Vec<f32>, shape: &[usize]) -> Result<Tensor, String> {
    crate::plugin::budget::numel(shape).map_err(String::from)?;
    Tensor::from_vec(data, shape, &Device::Cpu).map_err(|e| e.to_string())
}

/// Copies a mask into an f32 tensor of 0/1.
pub fn mask_tensor(mask: &crate::mask::Mask) -> Result<Tensor, String> {
    let data: Vec<f32> = mask
        .keep()
        .iter()
        .map(|&k| if k { 1.0 } else { 0.0 })
        .collect();
    tensor_from(data, mask.shape())
}

/// `weight * mask`, the pruned weight with zeros in place.
pub fn apply_mask(weight: &Tensor, mask: &crate::mask::Mask) -> Result<Tensor, String> {
    if weight.dims() != mask.shape() {
        return Err(format!(
            "mask shape {:?} does not match weight shape {:?}",
            mask.shape(),
            weight.dims()
        ));
    }
    let data = with_f32(weight, |w| {
        use rayon::prelude::*;
        w.par_iter()
            .zip(mask.keep().par_iter())
            .map(|(&x, &k)| if k { x } else { 0.0 })
            .collect::<Vec<f32>>()
    })?;
    tensor_from(data, weight.dims())
}
