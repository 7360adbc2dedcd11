//! Test plugin for the hostile-plugin suite (`tests/hostile.rs`): attacks ONE host import with
//! ONE kind of bad argument, chosen by the `attack` parameter. The kinds: absurd (huge sizes,
//! counts and offsets, NaN or infinite densities and factors, broadcasts whose result would
//! be tens of GB), overflowing (element counts that wrap a 32- or 64-bit integer, offset +
//! count overflow), empty (zero dimensions, empty lists and names), duplicated (one tensor or
//! mask passed many times), dropped (a handle used after its drop), forged (indices the host
//! never gave, and a mask index passed as a tensor or the reverse) and hoarding (creating
//! without dropping until the host says no), plus malformed outputs.
//!
//! Whatever the host answers, the run must fail: a host refusal is passed on as the plugin's
//! error (so the run's message names the host's cause); a call the host should have refused
//! but did not ends with an error starting `UNREFUSED:`; a call that may legitimately succeed
//! (reading zero elements, an empty structure) ends with an error saying the attack "ended
//! without a host refusal". Messages never contain the attack's name, except in these two
//! cases, so the suite cannot mistake the name for the host's cause.
//!
//! The `validate-*` attacks happen in `validate`, at planning (a loop, a trap, a flood of
//! problems); their `apply` entries are never reached. The `progress-*` attacks flood the
//! `progress` import (a tight loop, huge messages, absurd counts), which must stay harmless.
//!
//! The suite reads the names of [`ATTACKS`] from this file to check that it drives them all:
//! keep one entry per line, starting `("name", |`.
use espalier_plugin_sdk::*;

const NAME: &str = "hostile-calls";

/// A handle index no table ever reached: the host never gave it.
const FORGED: u32 = 1_000_000;

/// Four dimensions of 2^16: their product is 2^64, which a 64-bit element count wraps to 0,
/// so an unchecked host sees a shape of zero elements (and an empty data list matches it).
const WRAPS_TO_ZERO: [u32; 4] = [1 << 16; 4];

/// Names and strings of 1 MiB: absurd for a layer name, small for the guest's memory.
const HUGE_NAME: usize = 1 << 20;

/// The attacks, by name. Non-capturing closures, so the table is plain data.
type Attack = fn(&Ctx) -> Result<StageOutput, String>;

struct Ctx {
    attack: String,
    targets: Vec<Target>,
}

impl Ctx {
    /// The first target layer (the smallest attention projection of block 0 in a default run).
    fn layer(&self) -> Result<&str, String> {
        self.targets
            .first()
            .map(|t| t.layer.name.as_str())
            .ok_or_else(|| "the stage has no targets".to_string())
    }

    /// The largest target layer (the MLP weights of tiny-llama: 8192 elements).
    fn largest(&self) -> Result<&Target, String> {
        self.targets
            .iter()
            .max_by_key(|t| t.layer.shape.iter().map(|&d| u64::from(d)).product::<u64>())
            .ok_or_else(|| "the stage has no targets".to_string())
    }

    fn weight(&self) -> Result<Tensor, String> {
        model::weight(self.layer()?)
    }

    /// A mask over the first target (keeps half), from the host.
    fn mask(&self) -> Result<Mask, String> {
        kernels::select(&self.weight()?, Structure::Unstructured, 0.5)
    }

    /// The error for a call the host should have refused and did not.
    fn unrefused(&self, what: &str) -> String {
        format!(
            "UNREFUSED: attack `{}`: the host accepted {what}",
            self.attack
        )
    }

    /// The error for an attack whose calls may legitimately succeed: the run still fails.
    fn done(&self, what: &str) -> String {
        format!(
            "attack `{}` ended without a host refusal: {what}",
            self.attack
        )
    }

    /// Valid masks for every target (the benign baseline's output).
    fn valid_masks(&self) -> Result<Vec<LayerMask>, String> {
        let mut masks = Vec::new();
        for t in &self.targets {
            let w = model::weight(&t.layer.name)?;
            let scores = kernels::unary(UnaryOp::Abs, &w);
            let mask = kernels::select(&scores, Structure::Unstructured, target_density(t)?)?;
            masks.push(LayerMask {
                layer: t.layer.name.clone(),
                mask,
            });
        }
        Ok(masks)
    }
}

/// Passes a host refusal on as the plugin's error; an acceptance is reported as such.
fn refused<T>(c: &Ctx, r: Result<T, String>, what: &str) -> Result<StageOutput, String> {
    match r {
        Ok(_) => Err(c.unrefused(what)),
        Err(e) => Err(e),
    }
}

/// The same for a call whose success is legitimate.
fn answered<T>(c: &Ctx, r: Result<T, String>, what: &str) -> Result<StageOutput, String> {
    match r {
        Ok(_) => Err(c.done(what)),
        Err(e) => Err(e),
    }
}

/// A tensor handle the host never gave.
fn forged_tensor() -> Tensor {
    // SAFETY: deliberately unsound towards the host: that is the attack. The guest itself never
    // dereferences the handle.
    unsafe { Tensor::from_handle(FORGED) }
}

fn forged_mask() -> Mask {
    // SAFETY: see `forged_tensor`.
    unsafe { Mask::from_handle(FORGED) }
}

/// A handle to a tensor the guest has already dropped.
fn dropped_tensor(t: Tensor) -> Tensor {
    let index = t.handle();
    drop(t);
    // SAFETY: see `forged_tensor`.
    unsafe { Tensor::from_handle(index) }
}

fn dropped_mask(m: Mask) -> Mask {
    let index = m.handle();
    drop(m);
    // SAFETY: see `forged_tensor`.
    unsafe { Mask::from_handle(index) }
}

/// A "mask" whose index is really a tensor's. The tensor is leaked so the index stays live.
fn tensor_as_mask(t: Tensor) -> Mask {
    // SAFETY: see `forged_tensor`.
    unsafe { Mask::from_handle(t.take_handle()) }
}

/// A "tensor" whose index is really a mask's.
fn mask_as_tensor(m: Mask) -> Tensor {
    // SAFETY: see `forged_tensor`.
    unsafe { Tensor::from_handle(m.take_handle()) }
}

/// A host tensor of this shape filled with ones.
fn ones(shape: &[u32]) -> Result<Tensor, String> {
    let n: usize = shape.iter().map(|&d| d as usize).product();
    tensors::from_f32(shape, &vec![1.0; n])
}

/// A tensor whose element count wraps to zero, or the host's refusal to make one (the outcome
/// the attacks built on it hope for, passed on as their error).
fn wrapped() -> Result<Tensor, String> {
    tensors::from_f32(&WRAPS_TO_ZERO, &[])
}

fn huge_name() -> String {
    "x".repeat(HUGE_NAME)
}

/// Creates without dropping until the host refuses (or the sandbox stops the plugin).
fn hoard<T>(mut make: impl FnMut() -> Result<T, String>) -> Result<StageOutput, String> {
    let mut kept = Vec::new();
    loop {
        kept.push(make()?);
        std::hint::black_box(&kept);
    }
}

/// Calls an import that takes no argument without end, keeping each answer with 4 KiB of the
/// guest's own bookkeeping, until the guest's memory cap (or the deadline) stops it: the host
/// must stop a guest in the middle of a stream of its calls as cleanly as anywhere else.
fn hoard_in_guest<T>(mut call: impl FnMut() -> Result<T, String>) -> Result<StageOutput, String> {
    let mut kept = Vec::new();
    loop {
        kept.push((call()?, Vec::<u8>::with_capacity(4 << 10)));
        // Keeps the optimiser from proving the allocations unused.
        std::hint::black_box(&kept);
    }
}

fn output(masks: Vec<LayerMask>) -> Result<StageOutput, String> {
    Ok(masks_output(masks))
}

static ATTACKS: &[(&str, Attack)] = &[
    // The benign baseline: valid masks for every target.
    ("benign", |c| output(c.valid_masks()?)),
    // --- tensors: resource `tensor` -------------------------------------------------------
    ("tensor-shape-forged", |c| {
        let s = forged_tensor().shape();
        Err(c.unrefused(&format!("a forged handle (shape {s:?})")))
    }),
    ("tensor-shape-dropped", |c| {
        let s = dropped_tensor(c.weight()?).shape();
        Err(c.unrefused(&format!("a dropped handle (shape {s:?})")))
    }),
    ("tensor-dtype-forged", |c| {
        let _ = forged_tensor().dtype();
        Err(c.unrefused("a forged handle"))
    }),
    ("tensor-dtype-dropped", |c| {
        let _ = dropped_tensor(c.weight()?).dtype();
        Err(c.unrefused("a dropped handle"))
    }),
    ("tensor-numel-forged", |c| {
        let n = forged_tensor().numel();
        Err(c.unrefused(&format!("a forged handle (numel {n})")))
    }),
    ("tensor-numel-dropped", |c| {
        let n = dropped_tensor(c.weight()?).numel();
        Err(c.unrefused(&format!("a dropped handle (numel {n})")))
    }),
    ("tensor-numel-mask-as-tensor", |c| {
        let n = mask_as_tensor(c.mask()?).numel();
        Err(c.unrefused(&format!("a mask's handle as a tensor (numel {n})")))
    }),
    ("tensor-read-count-huge", |c| {
        refused(
            c,
            c.weight()?.read(0, u32::MAX),
            "a read of 2^32-1 elements",
        )
    }),
    ("tensor-read-offset-overflow", |c| {
        refused(c, c.weight()?.read(u64::MAX, 16), "offset 2^64-1 + 16")
    }),
    ("tensor-read-past-end", |c| {
        let w = c.weight()?;
        refused(c, w.read(w.numel() - 1, 2), "a read one past the end")
    }),
    ("tensor-read-empty", |c| {
        let w = c.weight()?;
        match w.read(w.numel(), 0) {
            Ok(v) if v.is_empty() => Err(c.done("a read of 0 elements at the end is empty")),
            Ok(v) => Err(c.unrefused(&format!("a read of 0 elements, returning {}", v.len()))),
            Err(e) => Err(e),
        }
    }),
    ("tensor-read-forged", |c| {
        refused(c, forged_tensor().read(0, 1), "a read of a forged handle")
    }),
    ("tensor-read-dropped", |c| {
        refused(
            c,
            dropped_tensor(c.weight()?).read(0, 1),
            "a read of a dropped handle",
        )
    }),
    ("tensor-read-rows-overflow", |c| {
        refused(
            c,
            c.weight()?.read_rows(u32::MAX, u32::MAX),
            "rows 2^32-1 .. 2^33-2",
        )
    }),
    ("tensor-read-rows-past-end", |c| {
        let w = c.weight()?;
        let rows = w.shape().first().copied().unwrap_or(0);
        refused(c, w.read_rows(rows, 1), "a row past the end")
    }),
    ("tensor-read-rows-not-2d", |c| {
        refused(c, ones(&[16])?.read_rows(0, 1), "read-rows on a 1-D tensor")
    }),
    ("tensor-read-rows-empty", |c| {
        let w = c.weight()?;
        let rows = w.shape().first().copied().unwrap_or(0);
        match w.read_rows(rows, 0) {
            Ok(v) if v.is_empty() => Err(c.done("a read of 0 rows at the end is empty")),
            Ok(v) => Err(c.unrefused(&format!("a read of 0 rows, returning {}", v.len()))),
            Err(e) => Err(e),
        }
    }),
    ("tensor-read-rows-forged", |c| {
        refused(c, forged_tensor().read_rows(0, 1), "a forged handle")
    }),
    ("tensor-read-rows-dropped", |c| {
        refused(
            c,
            dropped_tensor(c.weight()?).read_rows(0, 1),
            "a dropped handle",
        )
    }),
    ("tensor-drop-forged", |c| {
        drop(forged_tensor());
        Err(c.unrefused("the drop of a forged handle"))
    }),
    ("tensor-drop-twice", |c| {
        drop(dropped_tensor(c.weight()?));
        Err(c.unrefused("a second drop of one handle"))
    }),
    ("tensor-drop-mask-as-tensor", |c| {
        drop(mask_as_tensor(c.mask()?));
        Err(c.unrefused("the drop of a mask's handle as a tensor"))
    }),
    // --- tensors: from-f32 ----------------------------------------------------------------
    ("from-f32-count-wraps-to-zero", |c| {
        refused(c, wrapped(), "shape [2^16; 4] (2^64 elements) with no data")
    }),
    ("from-f32-count-overflows-u32", |c| {
        refused(
            c,
            tensors::from_f32(&[1 << 16, (1 << 16) + 1], &[]),
            "shape [2^16, 2^16+1] with no data",
        )
    }),
    ("from-f32-count-overflows-u64", |c| {
        refused(
            c,
            tensors::from_f32(&[u32::MAX; 3], &[]),
            "shape [2^32-1; 3] with no data",
        )
    }),
    ("from-f32-length-mismatch", |c| {
        refused(
            c,
            tensors::from_f32(&[8, 8], &[1.0, 2.0, 3.0]),
            "3 values for 64 elements",
        )
    }),
    ("from-f32-over-budget", |c| {
        // 36 MB of data against a 32 MiB host budget.
        refused(c, ones(&[3000, 3000]), "a 36 MB upload")
    }),
    ("from-f32-zero-size", |c| {
        answered(
            c,
            tensors::from_f32(&[0, 0], &[]),
            "a [0, 0] tensor was made",
        )
    }),
    ("from-f32-hoard", |_| {
        let data = vec![1.0f32; 1 << 18];
        hoard(|| tensors::from_f32(&[1 << 10, 1 << 8], &data))
    }),
    // --- kernels: resource `mask` ---------------------------------------------------------
    ("mask-shape-forged", |c| {
        let s = forged_mask().shape();
        Err(c.unrefused(&format!("a forged handle (shape {s:?})")))
    }),
    ("mask-shape-dropped", |c| {
        let s = dropped_mask(c.mask()?).shape();
        Err(c.unrefused(&format!("a dropped handle (shape {s:?})")))
    }),
    ("mask-density-forged", |c| {
        let d = forged_mask().density();
        Err(c.unrefused(&format!("a forged handle (density {d})")))
    }),
    ("mask-density-dropped", |c| {
        let d = dropped_mask(c.mask()?).density();
        Err(c.unrefused(&format!("a dropped handle (density {d})")))
    }),
    ("mask-density-tensor-as-mask", |c| {
        let d = tensor_as_mask(c.weight()?).density();
        Err(c.unrefused(&format!("a tensor's handle as a mask (density {d})")))
    }),
    ("mask-kept-forged", |c| {
        let k = forged_mask().kept();
        Err(c.unrefused(&format!("a forged handle (kept {k})")))
    }),
    ("mask-kept-dropped", |c| {
        let k = dropped_mask(c.mask()?).kept();
        Err(c.unrefused(&format!("a dropped handle (kept {k})")))
    }),
    ("mask-structure-forged", |c| {
        let _ = forged_mask().structure();
        Err(c.unrefused("a forged handle"))
    }),
    ("mask-structure-dropped", |c| {
        let _ = dropped_mask(c.mask()?).structure();
        Err(c.unrefused("a dropped handle"))
    }),
    ("mask-drop-forged", |c| {
        drop(forged_mask());
        Err(c.unrefused("the drop of a forged handle"))
    }),
    ("mask-drop-twice", |c| {
        drop(dropped_mask(c.mask()?));
        Err(c.unrefused("a second drop of one handle"))
    }),
    // --- kernels: unary -------------------------------------------------------------------
    ("unary-forged", |c| {
        let _ = kernels::unary(UnaryOp::Abs, &forged_tensor());
        Err(c.unrefused("a forged handle"))
    }),
    ("unary-dropped", |c| {
        let _ = kernels::unary(UnaryOp::Abs, &dropped_tensor(c.weight()?));
        Err(c.unrefused("a dropped handle"))
    }),
    ("unary-mask-as-tensor", |c| {
        let _ = kernels::unary(UnaryOp::Abs, &mask_as_tensor(c.mask()?));
        Err(c.unrefused("a mask's handle as a tensor"))
    }),
    ("unary-hoard", |c| {
        let w = c.weight()?;
        hoard(|| Ok(kernels::unary(UnaryOp::Square, &w)))
    }),
    // --- kernels: binary ------------------------------------------------------------------
    ("binary-broadcast-huge", |c| {
        // [1, n] * [n, 1] = [n, n]: 10^10 elements, 40 GB.
        let n = 100_000;
        let (a, b) = (ones(&[1, n])?, ones(&[n, 1])?);
        refused(
            c,
            kernels::binary(BinaryOp::Mul, &a, &b),
            "a 40 GB broadcast",
        )
    }),
    ("binary-broadcast-over-budget", |c| {
        // [1, 8192] + [8192, 1]: 256 MiB against a 32 MiB budget.
        let n = 8192;
        let (a, b) = (ones(&[1, n])?, ones(&[n, 1])?);
        refused(
            c,
            kernels::binary(BinaryOp::Add, &a, &b),
            "a 256 MiB broadcast",
        )
    }),
    ("binary-shape-mismatch", |c| {
        let (a, b) = (ones(&[2, 3])?, ones(&[4, 5])?);
        refused(
            c,
            kernels::binary(BinaryOp::Sub, &a, &b),
            "shapes [2, 3] and [4, 5]",
        )
    }),
    ("binary-forged", |c| {
        let w = c.weight()?;
        refused(
            c,
            kernels::binary(BinaryOp::Mul, &w, &forged_tensor()),
            "a forged handle",
        )
    }),
    ("binary-dropped", |c| {
        let w = c.weight()?;
        let gone = dropped_tensor(c.weight()?);
        refused(
            c,
            kernels::binary(BinaryOp::Mul, &gone, &w),
            "a dropped handle",
        )
    }),
    // --- kernels: scale -------------------------------------------------------------------
    ("scale-nan-factor", |c| {
        let t = kernels::scale(&c.weight()?, f32::NAN);
        let v = t.read(0, 1)?;
        Err(c.done(&format!("scaling by NaN gave {v:?}")))
    }),
    ("scale-inf-factor", |c| {
        let t = kernels::scale(&c.weight()?, f32::INFINITY);
        let v = t.read(0, 1)?;
        Err(c.done(&format!("scaling by infinity gave {v:?}")))
    }),
    ("scale-forged", |c| {
        let _ = kernels::scale(&forged_tensor(), 2.0);
        Err(c.unrefused("a forged handle"))
    }),
    ("scale-dropped", |c| {
        let _ = kernels::scale(&dropped_tensor(c.weight()?), 2.0);
        Err(c.unrefused("a dropped handle"))
    }),
    // --- kernels: reduce ------------------------------------------------------------------
    ("reduce-axis-huge", |c| {
        refused(
            c,
            kernels::reduce(ReduceOp::Sum, &c.weight()?, u32::MAX),
            "axis 2^32-1",
        )
    }),
    ("reduce-wrapped-shape", |c| {
        let t = wrapped()?;
        refused(
            c,
            kernels::reduce(ReduceOp::Sum, &t, 3),
            "a sum over a [2^16; 4] tensor",
        )
    }),
    ("reduce-max-zero-rows", |c| {
        let t = tensors::from_f32(&[0, 64], &[])?;
        answered(
            c,
            kernels::reduce(ReduceOp::Max, &t, 0),
            "the max over zero rows",
        )
    }),
    ("reduce-forged", |c| {
        refused(
            c,
            kernels::reduce(ReduceOp::Sum, &forged_tensor(), 0),
            "a forged handle",
        )
    }),
    ("reduce-dropped", |c| {
        refused(
            c,
            kernels::reduce(ReduceOp::Sum, &dropped_tensor(c.weight()?), 0),
            "a dropped handle",
        )
    }),
    // --- kernels: group-norms -------------------------------------------------------------
    ("group-norms-zero-block", |c| {
        let s = Structure::Blocks(BlockShape { rows: 0, cols: 0 });
        refused(c, kernels::group_norms(&c.weight()?, s, 2.0), "0x0 blocks")
    }),
    ("group-norms-zero-m", |c| {
        let s = Structure::NOfM(NOfM { n: 0, m: 0 });
        refused(c, kernels::group_norms(&c.weight()?, s, 2.0), "0:0")
    }),
    ("group-norms-nan-p", |c| {
        answered(
            c,
            kernels::group_norms(&c.weight()?, Structure::Rows, f32::NAN),
            "p = NaN",
        )
    }),
    ("group-norms-rows-zero-cols", |c| {
        let t = tensors::from_f32(&[64, 0], &[])?;
        answered(
            c,
            kernels::group_norms(&t, Structure::Rows, 2.0),
            "row norms of a [64, 0] tensor",
        )
    }),
    ("group-norms-columns-zero-rows", |c| {
        let t = tensors::from_f32(&[0, 64], &[])?;
        answered(
            c,
            kernels::group_norms(&t, Structure::Columns, 2.0),
            "column norms of a [0, 64] tensor",
        )
    }),
    ("group-norms-wrapped-shape", |c| {
        let t = wrapped()?;
        refused(
            c,
            kernels::group_norms(&t, Structure::Rows, 2.0),
            "norms of a [2^16; 4] tensor",
        )
    }),
    ("group-norms-forged", |c| {
        refused(
            c,
            kernels::group_norms(&forged_tensor(), Structure::Rows, 2.0),
            "a forged handle",
        )
    }),
    ("group-norms-dropped", |c| {
        refused(
            c,
            kernels::group_norms(&dropped_tensor(c.weight()?), Structure::Rows, 2.0),
            "a dropped handle",
        )
    }),
    // --- kernels: select ------------------------------------------------------------------
    ("select-nan-density", |c| {
        refused(
            c,
            kernels::select(&c.weight()?, Structure::Unstructured, f64::NAN),
            "density NaN",
        )
    }),
    ("select-inf-density", |c| {
        refused(
            c,
            kernels::select(&c.weight()?, Structure::Unstructured, f64::INFINITY),
            "density infinity",
        )
    }),
    ("select-negative-density", |c| {
        refused(
            c,
            kernels::select(&c.weight()?, Structure::Rows, -0.5),
            "density -0.5",
        )
    }),
    ("select-n-greater-than-m", |c| {
        let s = Structure::NOfM(NOfM { n: 3, m: 2 });
        refused(c, kernels::select(&c.weight()?, s, 0.5), "3:2")
    }),
    ("select-row-groups-huge", |c| {
        refused(
            c,
            kernels::select(&c.weight()?, Structure::RowGroups(u32::MAX), 0.5),
            "row groups of 2^32-1",
        )
    }),
    ("select-rows-zero-cols", |c| {
        let t = tensors::from_f32(&[64, 0], &[])?;
        answered(
            c,
            kernels::select(&t, Structure::Rows, 0.5),
            "rows of a [64, 0] tensor",
        )
    }),
    ("select-columns-zero-rows", |c| {
        let t = tensors::from_f32(&[0, 64], &[])?;
        answered(
            c,
            kernels::select(&t, Structure::Columns, 0.5),
            "columns of a [0, 64] tensor",
        )
    }),
    ("select-blocks-empty", |c| {
        let t = tensors::from_f32(&[0, 0], &[])?;
        let s = Structure::Blocks(BlockShape { rows: 4, cols: 4 });
        answered(
            c,
            kernels::select(&t, s, 0.5),
            "4x4 blocks of a [0, 0] tensor",
        )
    }),
    ("select-n-of-m-zero-rows", |c| {
        let t = tensors::from_f32(&[0, 8], &[])?;
        let s = Structure::NOfM(NOfM { n: 2, m: 4 });
        answered(c, kernels::select(&t, s, 0.5), "2:4 of a [0, 8] tensor")
    }),
    ("select-wrapped-shape", |c| {
        let t = wrapped()?;
        refused(
            c,
            kernels::select(&t, Structure::Columns, 0.5),
            "a selection over a [2^16; 4] tensor",
        )
    }),
    ("select-forged", |c| {
        refused(
            c,
            kernels::select(&forged_tensor(), Structure::Unstructured, 0.5),
            "a forged handle",
        )
    }),
    ("select-dropped", |c| {
        refused(
            c,
            kernels::select(&dropped_tensor(c.weight()?), Structure::Unstructured, 0.5),
            "a dropped handle",
        )
    }),
    ("select-hoard", |c| {
        let w = model::weight(&c.largest()?.layer.name)?;
        hoard(|| kernels::select(&w, Structure::Unstructured, 0.5))
    }),
    // --- kernels: select-global -----------------------------------------------------------
    ("select-global-duplicate-huge", |c| {
        // One 16 MiB tensor passed 1000 times: 16 GB if the host copies each.
        let t = ones(&[1 << 12, 1 << 10])?;
        let many: Vec<&Tensor> = std::iter::repeat_n(&t, 1000).collect();
        refused(
            c,
            kernels::select_global(&many, 0.5),
            "one 16 MiB tensor 1000 times",
        )
    }),
    (
        "select-global-empty-list",
        |c| match kernels::select_global(&[], 0.5) {
            Ok(m) if m.is_empty() => Err(c.done("no tensors gave no masks")),
            Ok(m) => Err(c.unrefused(&format!("no tensors, returning {} masks", m.len()))),
            Err(e) => Err(e),
        },
    ),
    ("select-global-nan-density", |c| {
        let w = c.weight()?;
        refused(c, kernels::select_global(&[&w], f64::NAN), "density NaN")
    }),
    ("select-global-forged", |c| {
        let w = c.weight()?;
        let f = forged_tensor();
        refused(c, kernels::select_global(&[&w, &f], 0.5), "a forged handle")
    }),
    ("select-global-dropped", |c| {
        let w = c.weight()?;
        let gone = dropped_tensor(c.weight()?);
        refused(
            c,
            kernels::select_global(&[&w, &gone], 0.5),
            "a dropped handle",
        )
    }),
    ("select-global-hoard", |c| {
        let w = model::weight(&c.largest()?.layer.name)?;
        hoard(|| kernels::select_global(&[&w, &w, &w, &w], 0.5))
    }),
    // --- kernels: select-per-row ----------------------------------------------------------
    ("select-per-row-nan-density", |c| {
        refused(
            c,
            kernels::select_per_row(&c.weight()?, f64::NAN),
            "density NaN",
        )
    }),
    ("select-per-row-not-2d", |c| {
        refused(
            c,
            kernels::select_per_row(&ones(&[16])?, 0.5),
            "a 1-D tensor",
        )
    }),
    ("select-per-row-zero-cols", |c| {
        let t = tensors::from_f32(&[64, 0], &[])?;
        answered(
            c,
            kernels::select_per_row(&t, 0.5),
            "rows of a [64, 0] tensor",
        )
    }),
    ("select-per-row-wrapped-shape", |c| {
        let t = wrapped()?;
        refused(c, kernels::select_per_row(&t, 0.5), "a [2^16; 4] tensor")
    }),
    ("select-per-row-forged", |c| {
        refused(
            c,
            kernels::select_per_row(&forged_tensor(), 0.5),
            "a forged handle",
        )
    }),
    ("select-per-row-dropped", |c| {
        refused(
            c,
            kernels::select_per_row(&dropped_tensor(c.weight()?), 0.5),
            "a dropped handle",
        )
    }),
    // --- kernels: mask-from-bytes ---------------------------------------------------------
    ("mask-from-bytes-length-mismatch", |c| {
        refused(
            c,
            kernels::mask_from_bytes(&[8, 8], &[1; 3], Structure::Unstructured),
            "3 flags for 64 elements",
        )
    }),
    ("mask-from-bytes-wrapped-shape", |c| {
        refused(
            c,
            kernels::mask_from_bytes(&WRAPS_TO_ZERO, &[], Structure::Rows),
            "shape [2^16; 4] with no flags",
        )
    }),
    ("mask-from-bytes-count-overflows-u64", |c| {
        refused(
            c,
            kernels::mask_from_bytes(&[u32::MAX; 3], &[], Structure::Unstructured),
            "shape [2^32-1; 3] with no flags",
        )
    }),
    ("mask-from-bytes-rows-zero-cols", |c| {
        answered(
            c,
            kernels::mask_from_bytes(&[64, 0], &[], Structure::Rows),
            "a [64, 0] mask under rows",
        )
    }),
    ("mask-from-bytes-columns-zero-rows", |c| {
        answered(
            c,
            kernels::mask_from_bytes(&[0, 64], &[], Structure::Columns),
            "a [0, 64] mask under columns",
        )
    }),
    ("mask-from-bytes-row-groups-zero-cols", |c| {
        answered(
            c,
            kernels::mask_from_bytes(&[64, 0], &[], Structure::RowGroups(16)),
            "a [64, 0] mask under row groups of 16",
        )
    }),
    ("mask-from-bytes-column-groups-zero-rows", |c| {
        answered(
            c,
            kernels::mask_from_bytes(&[0, 64], &[], Structure::ColumnGroups(16)),
            "a [0, 64] mask under column groups of 16",
        )
    }),
    ("mask-from-bytes-blocks-empty", |c| {
        let s = Structure::Blocks(BlockShape { rows: 4, cols: 4 });
        answered(
            c,
            kernels::mask_from_bytes(&[0, 0], &[], s),
            "a [0, 0] mask under 4x4 blocks",
        )
    }),
    ("mask-from-bytes-n-of-m-zero-rows", |c| {
        let s = Structure::NOfM(NOfM { n: 2, m: 4 });
        answered(
            c,
            kernels::mask_from_bytes(&[0, 8], &[], s),
            "a [0, 8] mask under 2:4",
        )
    }),
    ("mask-from-bytes-over-budget", |c| {
        // 40 MiB of flags against a 32 MiB host budget (within the 64 MiB guest cap).
        let keep = vec![1u8; 40 << 20];
        refused(
            c,
            kernels::mask_from_bytes(&[40 << 10, 1 << 10], &keep, Structure::Unstructured),
            "a 40 MiB mask",
        )
    }),
    ("mask-from-bytes-hoard", |_| {
        let keep = vec![1u8; 4 << 20];
        hoard(|| kernels::mask_from_bytes(&[4 << 10, 1 << 10], &keep, Structure::Unstructured))
    }),
    // --- kernels: mask-and ----------------------------------------------------------------
    ("mask-and-shape-mismatch", |c| {
        let a = kernels::mask_from_bytes(&[2, 3], &[1; 6], Structure::Unstructured)?;
        let b = kernels::mask_from_bytes(&[3, 2], &[1; 6], Structure::Unstructured)?;
        refused(
            c,
            kernels::mask_and(&a, &b),
            "masks of shapes [2, 3] and [3, 2]",
        )
    }),
    ("mask-and-forged", |c| {
        let m = c.mask()?;
        refused(c, kernels::mask_and(&m, &forged_mask()), "a forged handle")
    }),
    ("mask-and-dropped", |c| {
        let m = c.mask()?;
        let gone = dropped_mask(c.mask()?);
        refused(c, kernels::mask_and(&gone, &m), "a dropped handle")
    }),
    ("mask-and-tensor-as-mask", |c| {
        let m = c.mask()?;
        let t = tensor_as_mask(c.weight()?);
        refused(c, kernels::mask_and(&m, &t), "a tensor's handle as a mask")
    }),
    ("mask-and-hoard", |c| {
        let w = model::weight(&c.largest()?.layer.name)?;
        let m = kernels::select(&w, Structure::Unstructured, 0.5)?;
        hoard(|| kernels::mask_and(&m, &m))
    }),
    // --- model ----------------------------------------------------------------------------
    ("model-info-hoard", |_| hoard_in_guest(|| Ok(model::info()))),
    ("model-layers-hoard", |_| {
        hoard_in_guest(|| Ok(model::layers()))
    }),
    ("model-weight-unknown", |c| {
        refused(c, model::weight("no.such.weight"), "an unknown weight")
    }),
    ("model-weight-empty-name", |c| {
        refused(c, model::weight(""), "an empty name")
    }),
    ("model-weight-huge-name", |c| {
        refused(c, model::weight(&huge_name()), "a 1 MiB name")
    }),
    ("model-weight-hoard", |c| {
        let name = c.layer()?.to_string();
        hoard(|| model::weight(&name))
    }),
    (
        "model-current-mask-unknown",
        |c| match model::current_mask("no.such.weight") {
            None => Err(c.done("no mask for an unknown weight")),
            Some(_) => Err(c.unrefused("an unknown weight, returning a mask")),
        },
    ),
    (
        "model-current-mask-huge-name",
        |c| match model::current_mask(&huge_name()) {
            None => Err(c.done("no mask for a 1 MiB name")),
            Some(_) => Err(c.unrefused("a 1 MiB name, returning a mask")),
        },
    ),
    ("model-current-mask-hoard", |c| {
        let name = c.largest()?.layer.name.clone();
        hoard(|| {
            model::current_mask(&name)
                .ok_or_else(|| format!("no current mask on `{name}`: run a stage before"))
        })
    }),
    // --- calibration ----------------------------------------------------------------------
    ("calibration-info-hoard", |_| {
        hoard_in_guest(|| Ok(calibration::info()))
    }),
    ("calibration-activation-norms-unknown", |c| {
        refused(
            c,
            calibration::activation_norms("no.such.weight"),
            "an unknown layer",
        )
    }),
    ("calibration-activation-norms-empty-name", |c| {
        refused(c, calibration::activation_norms(""), "an empty name")
    }),
    ("calibration-activation-norms-huge-name", |c| {
        refused(
            c,
            calibration::activation_norms(&huge_name()),
            "a 1 MiB name",
        )
    }),
    ("calibration-activation-norms-hoard", |c| {
        let name = c.layer()?.to_string();
        hoard(|| calibration::activation_norms(&name))
    }),
    ("calibration-loss-hoard", |_| {
        hoard_in_guest(calibration::loss)
    }),
    ("calibration-loss-with-mask-unknown-layer", |c| {
        let m = c.mask()?;
        refused(
            c,
            calibration::loss_with_mask("no.such.weight", &m),
            "an unknown layer",
        )
    }),
    ("calibration-loss-with-mask-empty-name", |c| {
        let m = c.mask()?;
        refused(c, calibration::loss_with_mask("", &m), "an empty name")
    }),
    ("calibration-loss-with-mask-shape-mismatch", |c| {
        let m = kernels::mask_from_bytes(&[2, 3], &[1; 6], Structure::Unstructured)?;
        refused(
            c,
            calibration::loss_with_mask(c.layer()?, &m),
            "a [2, 3] mask for the layer",
        )
    }),
    ("calibration-loss-with-mask-zero-size", |c| {
        let m = kernels::mask_from_bytes(&[0, 0], &[], Structure::Unstructured)?;
        refused(
            c,
            calibration::loss_with_mask(c.layer()?, &m),
            "a [0, 0] mask for the layer",
        )
    }),
    ("calibration-loss-with-mask-forged", |c| {
        refused(
            c,
            calibration::loss_with_mask(c.layer()?, &forged_mask()),
            "a forged handle",
        )
    }),
    ("calibration-loss-with-mask-dropped", |c| {
        refused(
            c,
            calibration::loss_with_mask(c.layer()?, &dropped_mask(c.mask()?)),
            "a dropped handle",
        )
    }),
    ("calibration-loss-with-mask-tensor-as-mask", |c| {
        refused(
            c,
            calibration::loss_with_mask(c.layer()?, &tensor_as_mask(c.weight()?)),
            "a tensor's handle as a mask",
        )
    }),
    ("calibration-loss-with-masks-same-layer-twice", |c| {
        let (a, b) = (c.mask()?, c.mask()?);
        let layer = c.layer()?.to_string();
        refused(
            c,
            calibration::loss_with_masks(&[(layer.clone(), &a), (layer, &b)]),
            "one layer twice",
        )
    }),
    ("calibration-loss-with-masks-duplicate-huge", |c| {
        // One mask for one layer, 200,000 times: GBs if the host copies each before looking.
        let t = c.largest()?;
        let w = model::weight(&t.layer.name)?;
        let m = kernels::select(&w, Structure::Unstructured, 0.5)?;
        let changes: Vec<(String, &Mask)> =
            (0..200_000).map(|_| (t.layer.name.clone(), &m)).collect();
        refused(
            c,
            calibration::loss_with_masks(&changes),
            "one layer and mask 200,000 times",
        )
    }),
    ("calibration-loss-with-masks-unknown-layer", |c| {
        let m = c.mask()?;
        refused(
            c,
            calibration::loss_with_masks(&[("no.such.weight".to_string(), &m)]),
            "an unknown layer",
        )
    }),
    ("calibration-loss-with-masks-empty-list", |c| {
        answered(
            c,
            calibration::loss_with_masks(&[]),
            "no changes gave the base loss",
        )
    }),
    ("calibration-loss-with-masks-forged", |c| {
        let f = forged_mask();
        refused(
            c,
            calibration::loss_with_masks(&[(c.layer()?.to_string(), &f)]),
            "a forged handle",
        )
    }),
    ("calibration-loss-with-masks-dropped", |c| {
        let gone = dropped_mask(c.mask()?);
        refused(
            c,
            calibration::loss_with_masks(&[(c.layer()?.to_string(), &gone)]),
            "a dropped handle",
        )
    }),
    ("calibration-gradients-unknown", |c| {
        refused(
            c,
            calibration::gradients("no.such.weight"),
            "an unknown layer",
        )
    }),
    ("calibration-gradients-huge-name", |c| {
        refused(c, calibration::gradients(&huge_name()), "a 1 MiB name")
    }),
    ("calibration-gradients-hoard", |c| {
        let name = c.layer()?.to_string();
        hoard(|| calibration::gradients(&name))
    }),
    ("calibration-fisher-unknown", |c| {
        refused(c, calibration::fisher("no.such.weight"), "an unknown layer")
    }),
    ("calibration-fisher-empty-name", |c| {
        refused(c, calibration::fisher(""), "an empty name")
    }),
    ("calibration-fisher-hoard", |c| {
        let name = c.layer()?.to_string();
        hoard(|| calibration::fisher(&name))
    }),
    // --- outputs --------------------------------------------------------------------------
    ("output-mask-unknown-layer", |c| {
        let mut masks = c.valid_masks()?;
        masks.push(LayerMask {
            layer: "no.such.weight".into(),
            mask: c.mask()?,
        });
        output(masks)
    }),
    ("output-mask-huge-layer-name", |c| {
        let mut masks = c.valid_masks()?;
        masks.push(LayerMask {
            layer: huge_name(),
            mask: c.mask()?,
        });
        output(masks)
    }),
    ("output-same-mask-two-layers", |c| {
        let mut masks = c.valid_masks()?;
        let index = masks[0].mask.handle();
        // SAFETY: see `forged_tensor`: the second layer gets the first one's handle.
        masks[1].mask = unsafe { Mask::from_handle(index) };
        output(masks)
    }),
    ("output-dropped-mask", |c| {
        let mut masks = c.valid_masks()?;
        let first = std::mem::replace(&mut masks[0].mask, c.mask()?);
        masks[0].mask = dropped_mask(first);
        output(masks)
    }),
    ("output-forged-mask", |c| {
        let mut masks = c.valid_masks()?;
        masks[0].mask = forged_mask();
        output(masks)
    }),
    ("output-tensor-as-mask", |c| {
        let mut masks = c.valid_masks()?;
        masks[0].mask = tensor_as_mask(c.weight()?);
        output(masks)
    }),
    ("output-duplicate-layer", |c| {
        let mut masks = c.valid_masks()?;
        masks.push(LayerMask {
            layer: masks[0].layer.clone(),
            mask: c.mask()?,
        });
        output(masks)
    }),
    ("output-missing-mask", |c| {
        let mut masks = c.valid_masks()?;
        masks.pop();
        output(masks)
    }),
    ("output-zero-size-mask", |c| {
        let mut masks = c.valid_masks()?;
        masks[0].mask = kernels::mask_from_bytes(&[0, 0], &[], Structure::Unstructured)?;
        output(masks)
    }),
    ("output-wrapped-shape-mask", |c| {
        let mut masks = c.valid_masks()?;
        masks[0].mask = kernels::mask_from_bytes(&WRAPS_TO_ZERO, &[], Structure::Unstructured)?;
        output(masks)
    }),
    ("progress-flood", |c| {
        // Millions of reports in a tight loop: the host keeps a handful and never blocks.
        let total = 2_000_000u64;
        for i in 0..=total {
            report_progress(i, total, "flood");
        }
        Err(c.done("two million progress reports"))
    }),
    ("progress-huge-message", |c| {
        // 16 MiB messages full of terminal escapes: the host keeps an escaped prefix.
        let message = format!("\u{1b}[2J\u{1b}]0;owned\u{7}{}", "x".repeat(16 << 20));
        for i in 0..8 {
            report_progress(i, 8, &message);
        }
        Err(c.done("huge progress messages"))
    }),
    ("progress-absurd-counts", |c| {
        report_progress(u64::MAX, 1, "more done than total");
        report_progress(0, u64::MAX, "an absurd total");
        report_progress(u64::MAX, 0, "an unknown total");
        report_progress(u64::MAX, u64::MAX, "");
        Err(c.done("absurd progress counts"))
    }),
    ("validate-loop", |c| {
        Err(c.unrefused("a stage whose validate never returns"))
    }),
    ("validate-trap", |c| {
        Err(c.unrefused("a stage whose validate trapped"))
    }),
    ("validate-flood", |c| {
        Err(c.unrefused("a stage with ten thousand problems"))
    }),
    ("output-budgets-from-mask-plugin", |c| {
        let mut out = masks_output(c.valid_masks()?);
        out.budgets = c
            .targets
            .iter()
            .map(|t| LayerBudget {
                layer: t.layer.name.clone(),
                density: 0.5,
            })
            .collect();
        Ok(out)
    }),
];

struct P;

impl Guest for P {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: NAME.into(),
            version: "0.0.1".into(),
            description: "A test plugin that attacks one host import with one kind of bad \
                          argument, chosen by the `attack` parameter."
                .into(),
            params: vec![required_param(
                "attack",
                ParamKind::Text,
                "Which attack to run (see the table in the source).",
            )],
            // Every need, so the calibration imports are served and computed before `apply`.
            needs: vec![
                Need::Weights,
                Need::Activations,
                Need::Loss,
                Need::Gradients,
            ],
            produces: OutputKind::Masks,
        }
    }

    fn validate(ctx: PlanningContext) -> Result<(), Vec<ParamProblem>> {
        match Params::new(&ctx).text("attack") {
            Ok("validate-loop") => loop {
                std::hint::spin_loop();
            },
            Ok("validate-trap") => core::arch::wasm32::unreachable(),
            Ok("validate-flood") => Err((0..10_000)
                .map(|i| ParamProblem {
                    at: if i % 2 == 0 {
                        ProblemAt::Param("p".repeat(1 << 10))
                    } else {
                        ProblemAt::Density
                    },
                    message: "\u{1b}]0;owned\u{7}".repeat(100),
                })
                .collect()),
            _ => Ok(()),
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let attack = Params::new(&ctx).text("attack")?.to_string();
        let Some((_, run)) = ATTACKS.iter().find(|(n, _)| *n == attack) else {
            return Err(format!("unknown attack `{attack}`"));
        };
        run(&Ctx {
            attack,
            targets: ctx.targets,
        })
    }
}

export_criterion!(P);
