//! The per-instance state of a plugin's Store and the host side of the WIT imports:
//! tensor handles, host kernels, model introspection, and the sandboxed WASI context.
//!
//! Every tensor a plugin touches stays here, in the Store's resource table; the guest holds
//! only handles. Host allocations made on a plugin's behalf count against a byte budget, so a
//! plugin cannot exhaust host memory by asking for copies in a loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use rayon::prelude::*;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::random::Deterministic;
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};

use super::bindings::v0_2::espalier::prune::calibration as calibration_v2;
use super::bindings::v0_3::espalier::prune::calibration as calibration_v3;
use super::bindings::v0_4::espalier::prune::{
    calibration as calibration_v4, progress as progress_v4,
};
use super::bindings::v0_5::espalier::prune::{
    calibration as calibration_v5, progress as progress_v5,
};
use super::bindings::v0_6::espalier::prune::{
    calibration as calibration_v6, model as model_v6, progress as progress_v6,
    training as training_v6,
};
use super::progress::ProgressGate;
use crate::calibration::Calibrator;
use crate::mask::{Mask, Structure};
use crate::ops;
use crate::tensor_util::{tensor_from, with_f32};

use super::budget::{self, GuestLimiter, HANDLE_BYTES, HostBudget};

pub mod obs;

/// A host-owned tensor behind a WIT `tensor` handle (candle tensors share storage on clone).
pub struct TensorHandle {
    /// The data.
    pub tensor: Tensor,
    /// Bytes booked against the plugin's host budget (0 for model weights, which share storage).
    booked: usize,
}

/// What a plugin may see of the model during one stage: weights with earlier masks applied
/// and the masks themselves. Cloning a candle tensor shares its storage, so building a view
/// copies no weights.
pub struct ModelView {
    /// Architecture-level facts.
    pub info: model_v6::ModelInfo,
    /// Every weight, as plugins see it.
    pub layers: Vec<model_v6::LayerInfo>,
    /// Current (masked) weights by name.
    pub weights: BTreeMap<String, Tensor>,
    /// Masks of earlier stages by layer name.
    pub masks: BTreeMap<String, Mask>,
    /// The weights as the run loaded them (`model.original-weight`, 0.5), kept only by runs
    /// with a stage that produces weights; empty otherwise.
    pub original_weights: BTreeMap<String, Tensor>,
    /// Calibration statistics of this model state, when the pipeline has calibration data
    /// (computed lazily, shared by every plugin call until the masks change).
    pub calibration: Option<Arc<Calibrator>>,
}

/// Sandbox limits of one plugin instance.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Linear-memory cap of the guest, in bytes.
    pub guest_memory: usize,
    /// Cap on tensors the host allocates for the plugin (kernel results, uploads), in bytes.
    pub host_memory: usize,
}

/// Most live entries in a Store's resource table (tensor and mask handles, WASI streams).
const MAX_TABLE_ENTRIES: usize = 1 << 16;

/// Bytes of guest stdout/stderr kept for the log; a plugin printing more traps.
const OUTPUT_CAPACITY: usize = 1 << 20;

/// Most elements one `read` may copy into the guest (64 Mi floats = 256 MiB); the guest's
/// memory cap bounds it further.
const MAX_READ: u64 = 64 << 20;

/// A clock frozen at the epoch: plugins must not depend on time.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The data of one plugin Store.
pub struct PluginState {
    table: ResourceTable,
    wasi: WasiCtx,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
    /// Enforces the guest memory cap over all of the guest's memories and tables.
    pub limits: GuestLimiter,
    limit_config: Limits,
    model: Arc<ModelView>,
    /// Bytes the host holds or is about to allocate for the plugin (see [`budget`]).
    budget: HostBudget,
    /// Time spent inside host imports (kernels, reads), to separate guest time from host time.
    pub host_time: Duration,
    /// Where `progress.report` goes during an `apply` whose caller watches progress; `None`
    /// (in `describe`, `validate`, or when nobody watches): reports are ignored.
    pub progress: Option<ProgressGate>,
    /// Damped inverse factors computed for this call's OBS updates (0.5), shared by the layers
    /// that read the same input (see [`obs`]).
    factors: obs::FactorCache,
}

impl PluginState {
    /// A fresh state with no filesystem, network, environment or clock, and deterministic
    /// randomness.
    pub fn new(model: Arc<ModelView>, limits: Limits) -> Self {
        let stdout = MemoryOutputPipe::new(OUTPUT_CAPACITY);
        let stderr = MemoryOutputPipe::new(OUTPUT_CAPACITY);
        let wasi = WasiCtxBuilder::new()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(Deterministic::new(vec![0x5a; 32]))
            .insecure_random(Deterministic::new(vec![0xa5; 32]))
            .insecure_random_seed(0)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let mut table = ResourceTable::new();
        // Every entry (our handles and WASI's streams alike) costs host memory outside the
        // byte budget's view of tensor data: bound their number too.
        table.set_max_capacity(MAX_TABLE_ENTRIES);
        PluginState {
            table,
            wasi,
            stdout,
            stderr,
            limits: GuestLimiter::new(limits.guest_memory),
            limit_config: limits,
            model,
            budget: HostBudget::new(limits.host_memory),
            host_time: Duration::ZERO,
            progress: None,
            factors: obs::FactorCache::default(),
        }
    }

    /// What the guest printed (stdout, stderr), lossily decoded.
    pub fn output(&self) -> (String, String) {
        (
            String::from_utf8_lossy(&self.stdout.contents()).into_owned(),
            String::from_utf8_lossy(&self.stderr.contents()).into_owned(),
        )
    }

    /// Takes a mask the guest returned out of the resource table.
    pub fn take_mask(&mut self, mask: Resource<Mask>) -> wasmtime::Result<Mask> {
        let mask = self.table.delete(mask)?;
        self.budget.release(budget::mask_bytes(mask.keep().len()));
        Ok(mask)
    }

    /// Takes a tensor the guest returned (updated weights, 0.5) out of the resource table.
    pub fn take_tensor(&mut self, t: Resource<TensorHandle>) -> wasmtime::Result<Tensor> {
        let handle = self.table.delete(t)?;
        self.budget.release(handle.booked);
        Ok(handle.tensor)
    }

    /// Hands the plugin a handle sharing a tensor the host holds (a weight, a gradient the
    /// fine-tune accumulated): only the handle is booked, as for `model.weight`.
    pub fn give_tensor(&mut self, tensor: Tensor) -> Result<Resource<TensorHandle>, String> {
        self.push_shared(tensor)
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    }

    /// Hands the plugin its own copy of a mask, booked like any mask it makes.
    pub fn give_mask(&mut self, mask: &Mask) -> Result<Resource<Mask>, String> {
        let numel = mask.keep().len();
        let copy = mask.clone();
        self.new_mask("a layer's mask", numel, 0, move |_| Ok(copy))
            .map_err(|e| e.to_string())
            .and_then(|r| r)
    }

    /// The most host bytes held for the plugin at once during this Store's life.
    pub fn host_peak_bytes(&self) -> usize {
        self.budget.peak()
    }

    /// Host bytes held for the plugin now (handles it has not dropped).
    pub fn host_bytes(&self) -> usize {
        self.budget.used()
    }

    fn tensor(&self, r: &Resource<TensorHandle>) -> wasmtime::Result<&Tensor> {
        Ok(&self.table.get(r)?.tensor)
    }

    fn mask(&self, r: &Resource<Mask>) -> wasmtime::Result<&Mask> {
        Ok(self.table.get(r)?)
    }

    /// Books a new tensor of `numel` f32 values (plus its handle) and `scratch` bytes of
    /// working memory, runs `make`, then keeps the result as a handle. Nothing sized by the
    /// plugin is allocated unless the booking succeeded; the scratch is returned afterwards,
    /// the result's bytes when the plugin drops the handle.
    fn new_tensor(
        &mut self,
        what: &str,
        numel: usize,
        scratch: usize,
        make: impl FnOnce(&Self) -> Result<Tensor, String>,
    ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
        let result = match budget::bytes_of(numel, 4, what)
            .and_then(|b| budget::sum(&[b, HANDLE_BYTES], what))
        {
            Ok(b) => b,
            Err(e) => return Ok(Err(e.into())),
        };
        self.new_entry(
            what,
            numel,
            result,
            scratch,
            make,
            Tensor::elem_count,
            |tensor| TensorHandle {
                tensor,
                booked: result,
            },
        )
    }

    /// Like [`Self::new_tensor`] for a mask of `numel` flags.
    fn new_mask(
        &mut self,
        what: &str,
        numel: usize,
        scratch: usize,
        make: impl FnOnce(&Self) -> Result<Mask, String>,
    ) -> wasmtime::Result<Result<Resource<Mask>, String>> {
        let result = budget::mask_bytes(numel);
        self.new_entry(
            what,
            numel,
            result,
            scratch,
            make,
            |m| m.keep().len(),
            |m| m,
        )
    }

    /// The booking shared by [`Self::new_tensor`] and [`Self::new_mask`]: `result + scratch`
    /// bytes booked before `make` runs, the scratch returned after it, and the result's bytes
    /// returned too unless `make` produced exactly `numel` elements that entered the table.
    #[allow(clippy::too_many_arguments)]
    fn new_entry<T, E: Send + 'static>(
        &mut self,
        what: &str,
        numel: usize,
        result: usize,
        scratch: usize,
        make: impl FnOnce(&Self) -> Result<T, String>,
        elements: impl FnOnce(&T) -> usize,
        entry: impl FnOnce(T) -> E,
    ) -> wasmtime::Result<Result<Resource<E>, String>> {
        let total = match budget::sum(&[result, scratch], what) {
            Ok(t) => t,
            Err(e) => return Ok(Err(e.into())),
        };
        if let Err(e) = self.budget.book(total, what) {
            return Ok(Err(e.into()));
        }
        let made = make(self);
        self.budget.release(scratch);
        let made = made.and_then(|x| match elements(&x) {
            n if n == numel => Ok(x),
            // A kernel whose result differs from its booking is a host bug; refuse it rather
            // than let the books drift.
            n => Err(format!(
                "{what}: internal size mismatch ({numel} elements booked, {n} made)"
            )),
        });
        match made {
            Ok(x) => {
                let pushed = self.table.push(entry(x));
                self.pushed(pushed, result)
            }
            Err(e) => {
                self.budget.release(result);
                Ok(Err(e))
            }
        }
    }

    /// A handle sharing storage the host already holds (a weight, a cached statistic): only
    /// the handle itself is booked.
    fn push_shared(
        &mut self,
        tensor: Tensor,
    ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
        if let Err(e) = self.budget.book(HANDLE_BYTES, "a handle") {
            return Ok(Err(e.into()));
        }
        let pushed = self.table.push(TensorHandle {
            tensor,
            booked: HANDLE_BYTES,
        });
        self.pushed(pushed, HANDLE_BYTES)
    }

    /// A new table entry, or the plugin's error when the table is full (its bytes returned).
    fn pushed<T>(
        &mut self,
        pushed: Result<Resource<T>, wasmtime::component::ResourceTableError>,
        booked: usize,
    ) -> wasmtime::Result<Result<Resource<T>, String>> {
        match pushed {
            Ok(r) => Ok(Ok(r)),
            Err(wasmtime::component::ResourceTableError::Full) => {
                self.budget.release(booked);
                Ok(Err(format!(
                    "the plugin holds {MAX_TABLE_ENTRIES} live handles, the most one call may \
                     hold; drop handles you no longer need"
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs a host import and books its time as host time.
    fn timed<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let start = Instant::now();
        let r = f(self);
        self.host_time += start.elapsed();
        r
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn dims_u32(t: &Tensor) -> Vec<u32> {
    t.dims().iter().map(|&d| d as u32).collect()
}

/// A plugin-supplied shape and its element count, refusing overflowing and over-long shapes.
fn checked_shape(shape: &[u32]) -> Result<(Vec<usize>, usize), String> {
    if shape.len() > budget::MAX_RANK {
        return Err(format!(
            "a shape of {} dimensions (at most {})",
            shape.len(),
            budget::MAX_RANK
        ));
    }
    let shape: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let numel = budget::numel(&shape)?;
    Ok((shape, numel))
}

/// Bytes `with_f32` copies for this tensor (a strided view or another dtype), else 0.
fn copy_cost(t: &Tensor) -> usize {
    if t.is_contiguous() && t.dtype() == candle_core::DType::F32 {
        0
    } else {
        t.elem_count().saturating_mul(4)
    }
}

/// Element-wise map over a tensor's data on the host threads.
fn map_f32(t: &Tensor, f: impl Fn(f32) -> f32 + Sync) -> Result<Tensor, String> {
    let data = with_f32(t, |v| v.par_iter().map(|&x| f(x)).collect::<Vec<f32>>())?;
    tensor_from(data, t.dims())
}

/// Keeps the `round(density * columns)` best scores of every row of a 2-D tensor (Wanda's
/// per-output comparison group); ties and NaNs follow `ops::top_k_flags`.
pub fn select_per_row(scores: &[f32], shape: &[usize], density: f64) -> Result<Mask, String> {
    let &[rows, cols] = shape else {
        return Err(format!(
            "select-per-row needs a 2-D tensor, this one has shape {shape:?}"
        ));
    };
    if scores.len() != rows * cols {
        return Err(format!(
            "scores have {} elements, shape {shape:?} has {}",
            scores.len(),
            rows * cols
        ));
    }
    let k = ops::kept_count(density, cols)?;
    let keep: Vec<bool> = if cols == 0 {
        Vec::new()
    } else {
        scores
            .par_chunks(cols)
            .flat_map_iter(|row| ops::top_k_flags(row, k))
            .collect()
    };
    Mask::new(shape.to_vec(), keep, Structure::Unstructured)
}

/// Implements the host side of one WIT version's shared interfaces (`tensors`, `kernels`,
/// `model`, `plugin-types`) on [`PluginState`]. The versions' generated traits and types are
/// distinct Rust items of identical shape, so one body serves them all: sandboxing, the host
/// byte budget and the `timed` host-time accounting cannot drift between versions. `$layer` and
/// `$info` convert the 0.5 model descriptions the view holds; `kernels_extra` adds the kernels
/// a version introduced.
macro_rules! impl_host_imports {
    ($module:ident, $v:ident, layer: $layer:path, info: $info:path, kernels_extra: { $($kernels_extra:tt)* }) => {
        impl_host_imports!($module, $v, layer: $layer, info: $info, kernels_extra: { $($kernels_extra)* }, model_extra: {});
    };
    ($module:ident, $v:ident, layer: $layer:path, info: $info:path, kernels_extra: { $($kernels_extra:tt)* }, model_extra: { $($model_extra:tt)* }) => {
    mod $module {
        use super::*;
        use crate::plugin::bindings::$v::espalier::prune::{kernels, model, plugin_types, tensors};

        /// WIT structure → host structure, refusing degenerate group sizes.
        pub(super) fn structure_from_wit(s: kernels::Structure) -> Result<Structure, String> {
            let positive = |v: u32, what: &str| {
                if v == 0 {
                    Err(format!("{what} must be positive"))
                } else {
                    Ok(v as usize)
                }
            };
            Ok(match s {
                kernels::Structure::Unstructured => Structure::Unstructured,
                kernels::Structure::Blocks(b) => Structure::Blocks {
                    rows: positive(b.rows, "block rows")?,
                    cols: positive(b.cols, "block cols")?,
                },
                kernels::Structure::NOfM(nm) => {
                    let m = positive(nm.m, "m of n:m")?;
                    let n = nm.n as usize;
                    if n > m {
                        return Err(format!("n:m with n = {n} > m = {m}"));
                    }
                    Structure::NOfM { n, m }
                }
                kernels::Structure::Rows => Structure::Rows,
                kernels::Structure::Columns => Structure::Columns,
                kernels::Structure::RowGroups(g) => Structure::RowGroups {
                    size: positive(g, "row group size")?,
                },
                kernels::Structure::ColumnGroups(g) => Structure::ColumnGroups {
                    size: positive(g, "column group size")?,
                },
            })
        }

        /// Host structure → WIT structure.
        fn structure_to_wit(s: Structure) -> kernels::Structure {
            match s {
                Structure::Unstructured => kernels::Structure::Unstructured,
                Structure::Blocks { rows, cols } => kernels::Structure::Blocks(kernels::BlockShape {
                    rows: rows as u32,
                    cols: cols as u32,
                }),
                Structure::NOfM { n, m } => kernels::Structure::NOfM(kernels::NOfM {
                    n: n as u32,
                    m: m as u32,
                }),
                Structure::Rows => kernels::Structure::Rows,
                Structure::Columns => kernels::Structure::Columns,
                Structure::RowGroups { size } => kernels::Structure::RowGroups(size as u32),
                Structure::ColumnGroups { size } => kernels::Structure::ColumnGroups(size as u32),
            }
        }

        impl tensors::HostTensor for PluginState {
            fn shape(&mut self, t: Resource<TensorHandle>) -> wasmtime::Result<Vec<u32>> {
                Ok(dims_u32(self.tensor(&t)?))
            }

            fn dtype(&mut self, _t: Resource<TensorHandle>) -> wasmtime::Result<tensors::Dtype> {
                Ok(tensors::Dtype::F32)
            }

            fn numel(&mut self, t: Resource<TensorHandle>) -> wasmtime::Result<u64> {
                Ok(self.tensor(&t)?.elem_count() as u64)
            }

            fn read(
                &mut self,
                t: Resource<TensorHandle>,
                offset: u64,
                count: u32,
            ) -> wasmtime::Result<Result<Vec<f32>, String>> {
                self.timed(|s| {
                    let tensor = s.tensor(&t)?.clone();
                    let numel = tensor.elem_count() as u64;
                    let count = u64::from(count);
                    if let Err(e) = s.check_read(count) {
                        return Ok(Err(e));
                    }
                    let Some(end) = offset.checked_add(count).filter(|&e| e <= numel) else {
                        return Ok(Err(format!(
                            "read of {count} elements at offset {offset} is outside a tensor of {numel}"
                        )));
                    };
                    // The copy lives until it is lowered into the guest: booked for the call.
                    let bytes = (count as usize).saturating_mul(4).saturating_add(copy_cost(&tensor));
                    match s.budget.with_scratch(bytes, "read", || {
                        with_f32(&tensor, |v| v[offset as usize..end as usize].to_vec())
                    }) {
                        Ok(r) => Ok(r),
                        Err(e) => Ok(Err(e.into())),
                    }
                })
            }

            fn read_rows(
                &mut self,
                t: Resource<TensorHandle>,
                start: u32,
                count: u32,
            ) -> wasmtime::Result<Result<Vec<f32>, String>> {
                self.timed(|s| {
                    let tensor = s.tensor(&t)?.clone();
                    let [rows, cols] = tensor.dims() else {
                        return Ok(Err(format!(
                            "read-rows needs a 2-D tensor, this one has shape {:?}",
                            tensor.dims()
                        )));
                    };
                    let (rows, cols) = (*rows as u64, *cols as u64);
                    let (start, count) = (u64::from(start), u64::from(count));
                    if start + count > rows {
                        return Ok(Err(format!(
                            "rows {start}..{} are outside a tensor of {rows} rows",
                            start + count
                        )));
                    }
                    let Some(elements) = count.checked_mul(cols) else {
                        return Ok(Err(format!("read of {count} rows of {cols} overflows")));
                    };
                    if let Err(e) = s.check_read(elements) {
                        return Ok(Err(e));
                    }
                    let bytes = (elements as usize).saturating_mul(4).saturating_add(copy_cost(&tensor));
                    match s.budget.with_scratch(bytes, "read-rows", || {
                        with_f32(&tensor, |v| {
                            v[(start * cols) as usize..((start + count) * cols) as usize].to_vec()
                        })
                    }) {
                        Ok(r) => Ok(r),
                        Err(e) => Ok(Err(e.into())),
                    }
                })
            }

            fn drop(&mut self, t: Resource<TensorHandle>) -> wasmtime::Result<()> {
                let handle = self.table.delete(t)?;
                self.budget.release(handle.booked);
                Ok(())
            }
        }

        impl tensors::Host for PluginState {
            fn from_f32(
                &mut self,
                shape: Vec<u32>,
                data: Vec<f32>,
            ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
                // `data` is a copy of guest memory, bounded by the guest's cap; it becomes the
                // tensor without another copy once booked.
                let (shape, numel) = match checked_shape(&shape) {
                    Ok(x) => x,
                    Err(e) => return Ok(Err(e)),
                };
                if numel != data.len() {
                    return Ok(Err(format!(
                        "shape {} needs {numel} values, got {}",
                        budget::short_shape(&shape),
                        data.len()
                    )));
                }
                self.new_tensor("from-f32", numel, 0, |_| tensor_from(data, &shape))
            }
        }

        impl kernels::HostMask for PluginState {
            fn shape(&mut self, m: Resource<Mask>) -> wasmtime::Result<Vec<u32>> {
                Ok(self.mask(&m)?.shape().iter().map(|&d| d as u32).collect())
            }

            fn density(&mut self, m: Resource<Mask>) -> wasmtime::Result<f64> {
                Ok(self.mask(&m)?.density())
            }

            fn kept(&mut self, m: Resource<Mask>) -> wasmtime::Result<u64> {
                Ok(self.mask(&m)?.kept() as u64)
            }

            fn structure(&mut self, m: Resource<Mask>) -> wasmtime::Result<kernels::Structure> {
                Ok(structure_to_wit(self.mask(&m)?.structure()))
            }

            fn drop(&mut self, m: Resource<Mask>) -> wasmtime::Result<()> {
                let mask = self.table.delete(m)?;
                self.budget.release(budget::mask_bytes(mask.keep().len()));
                Ok(())
            }
        }

        impl kernels::Host for PluginState {
            fn unary(
                &mut self,
                op: kernels::UnaryOp,
                t: Resource<TensorHandle>,
            ) -> wasmtime::Result<Resource<TensorHandle>> {
                self.timed(|s| {
                    let t = s.tensor(&t)?.clone();
                    let f: fn(f32) -> f32 = match op {
                        kernels::UnaryOp::Abs => f32::abs,
                        kernels::UnaryOp::Square => |x| x * x,
                        kernels::UnaryOp::Sqrt => f32::sqrt,
                        kernels::UnaryOp::Neg => |x| -x,
                        kernels::UnaryOp::Log => f32::ln,
                        kernels::UnaryOp::Exp => f32::exp,
                    };
                    // A unary op has no error result in the WIT: a refusal (full budget) traps.
                    s.new_tensor("unary", t.elem_count(), copy_cost(&t), |_| map_f32(&t, f))?
                        .map_err(wasmtime::Error::msg)
                })
            }

            fn binary(
                &mut self,
                op: kernels::BinaryOp,
                a: Resource<TensorHandle>,
                b: Resource<TensorHandle>,
            ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
                self.timed(|s| {
                    let (a, b) = (s.tensor(&a)?.clone(), s.tensor(&b)?.clone());
                    // The result's shape and size are known before anything is allocated: a
                    // [1, n] by [n, 1] broadcast is refused by the budget, not by the allocator.
                    let out = match budget::broadcast_shape(a.dims(), b.dims())
                        .and_then(|shape| budget::numel(&shape).map_err(String::from))
                    {
                        Ok(n) => n,
                        Err(e) => return Ok(Err(e)),
                    };
                    s.new_tensor("binary", out, 0, |_| {
                        match op {
                            kernels::BinaryOp::Add => a.broadcast_add(&b),
                            kernels::BinaryOp::Sub => a.broadcast_sub(&b),
                            kernels::BinaryOp::Mul => a.broadcast_mul(&b),
                            kernels::BinaryOp::Div => a.broadcast_div(&b),
                            kernels::BinaryOp::Maximum => a.broadcast_maximum(&b),
                            kernels::BinaryOp::Minimum => a.broadcast_minimum(&b),
                        }
                        .map_err(|e| {
                            format!(
                                "cannot broadcast shapes {:?} and {:?}: {e}",
                                a.dims(),
                                b.dims()
                            )
                        })
                    })
                })
            }

            fn scale(
                &mut self,
                t: Resource<TensorHandle>,
                factor: f32,
            ) -> wasmtime::Result<Resource<TensorHandle>> {
                self.timed(|s| {
                    let t = s.tensor(&t)?.clone();
                    s.new_tensor("scale", t.elem_count(), copy_cost(&t), |_| {
                        map_f32(&t, |x| x * factor)
                    })?
                    .map_err(wasmtime::Error::msg)
                })
            }

            fn reduce(
                &mut self,
                op: kernels::ReduceOp,
                t: Resource<TensorHandle>,
                axis: u32,
            ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
                self.timed(|s| {
                    let t = s.tensor(&t)?.clone();
                    let axis = axis as usize;
                    if axis >= t.rank() {
                        return Ok(Err(format!(
                            "axis {axis} is out of range for shape {:?}",
                            t.dims()
                        )));
                    }
                    if t.dims()[axis] == 0 {
                        return Ok(Err(format!(
                            "axis {axis} of shape {:?} is empty: nothing to reduce",
                            t.dims()
                        )));
                    }
                    // Every dimension but `axis` survives: for a [0, n] tensor the result still
                    // has n elements, so it is sized from the shape, not from the input's count.
                    let mut out_shape = t.dims().to_vec();
                    out_shape[axis] = 1;
                    let out = match budget::numel(&out_shape) {
                        Ok(n) => n,
                        Err(e) => return Ok(Err(e.into())),
                    };
                    s.new_tensor("reduce", out, copy_cost(&t), |_| {
                        match op {
                            kernels::ReduceOp::Sum => t.sum_keepdim(axis),
                            kernels::ReduceOp::Mean => t.mean_keepdim(axis),
                            kernels::ReduceOp::Max => t.max_keepdim(axis),
                            kernels::ReduceOp::Min => t.min_keepdim(axis),
                        }
                        .map_err(|e| e.to_string())
                    })
                })
            }

            fn group_norms(
                &mut self,
                t: Resource<TensorHandle>,
                st: kernels::Structure,
                p: f32,
            ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
                self.timed(|s| {
                    let structure = match structure_from_wit(st) {
                        Ok(x) => x,
                        Err(e) => return Ok(Err(e)),
                    };
                    let t = s.tensor(&t)?.clone();
                    let shape = t.dims().to_vec();
                    let groups = match ops::group_grid(&shape, structure) {
                        Ok((gr, gc)) => gr.saturating_mul(gc),
                        Err(e) => return Ok(Err(e)),
                    };
                    // Per-group f64 accumulators, plus a copy of a strided input.
                    let scratch = groups.saturating_mul(8).saturating_add(copy_cost(&t));
                    s.new_tensor("group-norms", groups, scratch, |_| {
                        with_f32(&t, |v| ops::group_norms(v, &shape, structure, p))
                            .and_then(|r| r)
                            .and_then(|(vals, grid)| tensor_from(vals, &grid))
                    })
                })
            }

            fn select(
                &mut self,
                scores: Resource<TensorHandle>,
                st: kernels::Structure,
                density: f64,
            ) -> wasmtime::Result<Result<Resource<Mask>, String>> {
                self.timed(|s| {
                    let structure = match structure_from_wit(st) {
                        Ok(x) => x,
                        Err(e) => return Ok(Err(e)),
                    };
                    let t = s.tensor(&scores)?.clone();
                    let shape = t.dims().to_vec();
                    let scratch = match ops::select_scratch_bytes(&shape, structure) {
                        Ok(b) => b.saturating_add(copy_cost(&t)),
                        Err(e) => return Ok(Err(e)),
                    };
                    s.new_mask("select", t.elem_count(), scratch, |_| {
                        with_f32(&t, |v| ops::select(v, &shape, structure, density)).and_then(|r| r)
                    })
                })
            }

            fn select_global(
                &mut self,
                scores: Vec<Resource<TensorHandle>>,
                density: f64,
            ) -> wasmtime::Result<Result<Vec<Resource<Mask>>, String>> {
                self.timed(|s| s.select_global_handles(&scores, density))
            }

            fn mask_from_bytes(
                &mut self,
                shape: Vec<u32>,
                keep: Vec<u8>,
                st: kernels::Structure,
            ) -> wasmtime::Result<Result<Resource<Mask>, String>> {
                self.timed(|s| {
                    let structure = match structure_from_wit(st) {
                        Ok(x) => x,
                        Err(e) => return Ok(Err(e)),
                    };
                    let (shape, numel) = match checked_shape(&shape) {
                        Ok(x) => x,
                        Err(e) => return Ok(Err(e)),
                    };
                    if keep.len() != numel {
                        return Ok(Err(format!(
                            "mask has {} entries but shape {} has {numel}",
                            keep.len(),
                            budget::short_shape(&shape)
                        )));
                    }
                    // `keep` is a copy of guest memory; the flags reuse its allocation.
                    s.new_mask("mask-from-bytes", numel, 0, |_| {
                        let flags: Vec<bool> = keep.into_iter().map(|b| b != 0).collect();
                        Mask::new(shape, flags, structure)
                    })
                })
            }

            fn mask_and(
                &mut self,
                a: Resource<Mask>,
                b: Resource<Mask>,
            ) -> wasmtime::Result<Result<Resource<Mask>, String>> {
                self.timed(|s| {
                    let (sa, sb) = (s.mask(&a)?.shape().to_vec(), s.mask(&b)?.shape().to_vec());
                    if sa != sb {
                        return Ok(Err(format!(
                            "cannot combine masks of shapes {} and {}",
                            budget::short_shape(&sa),
                            budget::short_shape(&sb)
                        )));
                    }
                    let numel = s.mask(&a)?.keep().len();
                    s.new_mask("mask-and", numel, 0, |s| {
                        let (a, b) = (s.mask(&a).map_err(|e| e.to_string())?, s.mask(&b).map_err(|e| e.to_string())?);
                        a.and(b)
                    })
                })
            }

            $($kernels_extra)*
        }

        impl model::Host for PluginState {
            fn info(&mut self) -> wasmtime::Result<model::ModelInfo> {
                Ok($info(&self.model.info))
            }

            fn layers(&mut self) -> wasmtime::Result<Vec<model::LayerInfo>> {
                Ok(self.model.layers.iter().map($layer).collect())
            }

            fn weight(&mut self, name: String) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
                match self.model.weights.get(&name).cloned() {
                    // Shares the model's storage: only the handle is booked.
                    Some(t) => self.push_shared(t),
                    None => Ok(Err(format!(
                        "the model has no weight named `{}`",
                        crate::display_safe::name(&name)
                    ))),
                }
            }

            fn current_mask(&mut self, name: String) -> wasmtime::Result<Option<Resource<Mask>>> {
                let Some(numel) = self.model.masks.get(&name).map(|m| m.keep().len()) else {
                    return Ok(None);
                };
                // The copy is the plugin's to keep: booked like any mask. No error result in
                // the WIT: a full budget traps.
                let r = self.new_mask("current-mask", numel, 0, |s| {
                    s.model
                        .masks
                        .get(&name)
                        .cloned()
                        .ok_or_else(|| "mask vanished".to_string())
                })?;
                r.map(Some).map_err(wasmtime::Error::msg)
            }

            $($model_extra)*
        }

        impl plugin_types::Host for PluginState {}
    }
    };
}

impl_host_imports!(
    v0_1_imports,
    v0_1,
    layer: crate::plugin::compat::v1::layer,
    info: crate::plugin::compat::v1::model_info,
    kernels_extra: {}
);

impl_host_imports!(
    v0_2_imports,
    v0_2,
    layer: crate::plugin::compat::v2::layer,
    info: crate::plugin::compat::v2::model_info,
    kernels_extra: {
        fn select_per_row(
            &mut self,
            scores: Resource<TensorHandle>,
            density: f64,
        ) -> wasmtime::Result<Result<Resource<Mask>, String>> {
            self.select_per_row_handle(&scores, density)
        }
    }
);

impl_host_imports!(
    v0_3_imports,
    v0_3,
    layer: crate::plugin::compat::v3::layer,
    info: crate::plugin::compat::v3::model_info,
    kernels_extra: {
        fn select_per_row(
            &mut self,
            scores: Resource<TensorHandle>,
            density: f64,
        ) -> wasmtime::Result<Result<Resource<Mask>, String>> {
            self.select_per_row_handle(&scores, density)
        }
    }
);

impl_host_imports!(
    v0_4_imports,
    v0_4,
    layer: crate::plugin::compat::v4::layer,
    info: crate::plugin::compat::v4::model_info,
    kernels_extra: {
        fn select_per_row(
            &mut self,
            scores: Resource<TensorHandle>,
            density: f64,
        ) -> wasmtime::Result<Result<Resource<Mask>, String>> {
            self.select_per_row_handle(&scores, density)
        }
    }
);

impl_host_imports!(
    v0_5_imports,
    v0_5,
    layer: crate::plugin::compat::v5::layer,
    info: crate::plugin::compat::v5::model_info,
    kernels_extra: {
        fn select_per_row(
            &mut self,
            scores: Resource<TensorHandle>,
            density: f64,
        ) -> wasmtime::Result<Result<Resource<Mask>, String>> {
            self.select_per_row_handle(&scores, density)
        }
    },
    model_extra: {
        fn original_weight(
            &mut self,
            name: String,
        ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
            self.original_weight_handle(&name)
        }
    }
);

impl_host_imports!(
    v0_6_imports,
    v0_6,
    layer: Clone::clone,
    info: Clone::clone,
    kernels_extra: {
        fn select_per_row(
            &mut self,
            scores: Resource<TensorHandle>,
            density: f64,
        ) -> wasmtime::Result<Result<Resource<Mask>, String>> {
            self.select_per_row_handle(&scores, density)
        }

        fn mask_bytes(
            &mut self,
            m: Resource<Mask>,
            offset: u64,
            count: u32,
        ) -> wasmtime::Result<Result<Vec<u8>, String>> {
            self.mask_bytes_of(&m, offset, count)
        }
    },
    model_extra: {
        fn original_weight(
            &mut self,
            name: String,
        ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
            self.original_weight_handle(&name)
        }
    }
);

/// The `training` interface (0.6.0) holds only types: the layers' state reaches the plugin as
/// the argument of its `update-masks` export.
impl training_v6::Host for PluginState {}

impl PluginState {
    /// `model.original-weight` (0.5 and later).
    fn original_weight_handle(
        &mut self,
        name: &str,
    ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
        let Some(current) = self.model.weights.get(name) else {
            return Ok(Err(format!(
                "the model has no weight named `{}`",
                crate::display_safe::name(name)
            )));
        };
        match self.model.original_weights.get(name).cloned() {
            Some(t) if t.dims() == current.dims() => self.push_shared(t),
            Some(_) => Ok(Err(format!(
                "`{}` was reshaped by a heads stage; its original weight no longer matches it",
                crate::display_safe::name(name)
            ))),
            None => Ok(Err(
                "original weights are kept only in runs with a stage whose plugin produces weights"
                    .into(),
            )),
        }
    }

    /// `kernels.mask-bytes` (0.6 and later): the copy is booked while it is made, like `read`.
    fn mask_bytes_of(
        &mut self,
        m: &Resource<Mask>,
        offset: u64,
        count: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        self.timed(|s| {
            let numel = s.mask(m)?.keep().len() as u64;
            let count = u64::from(count);
            // One byte per flag: the guest cap bounds it like a read of a quarter as many floats.
            if let Err(e) = s.check_read(count.div_ceil(4)) {
                return Ok(Err(e));
            }
            let Some(end) = offset.checked_add(count).filter(|&e| e <= numel) else {
                return Ok(Err(format!(
                    "mask-bytes of {count} flags at offset {offset} is outside a mask of {numel}"
                )));
            };
            let mask: &Mask = s.table.get(m)?;
            match s.budget.with_scratch(count as usize, "mask-bytes", || {
                Ok::<_, String>(
                    mask.keep()[offset as usize..end as usize]
                        .iter()
                        .map(|&k| u8::from(k))
                        .collect::<Vec<u8>>(),
                )
            }) {
                Ok(r) => Ok(r),
                Err(e) => Ok(Err(e.into())),
            }
        })
    }
}

impl PluginState {
    /// Refuses a read the guest could never hold: more than [`MAX_READ`] elements, or more
    /// bytes than the guest's memory cap.
    fn check_read(&self, count: u64) -> Result<(), String> {
        let bytes = count.saturating_mul(4);
        if count > MAX_READ || bytes > self.limit_config.guest_memory as u64 {
            return Err(format!(
                "read of {count} elements exceeds the limit ({MAX_READ} elements and the \
                 guest's {} MiB); read in chunks",
                self.limit_config.guest_memory >> 20
            ));
        }
        Ok(())
    }

    /// `kernels.select-per-row` (0.2 and later).
    fn select_per_row_handle(
        &mut self,
        scores: &Resource<TensorHandle>,
        density: f64,
    ) -> wasmtime::Result<Result<Resource<Mask>, String>> {
        self.timed(|s| {
            let t = s.tensor(scores)?.clone();
            let shape = t.dims().to_vec();
            let cols = shape.last().copied().unwrap_or(0);
            // Each worker ranks one row at a time: its keys plus a histogram.
            let per_worker = cols
                .saturating_mul(5)
                .saturating_add(ops::TOP_K_FIXED_SCRATCH);
            let scratch = per_worker
                .saturating_mul(rayon::current_num_threads())
                .saturating_add(copy_cost(&t));
            s.new_mask("select-per-row", t.elem_count(), scratch, |_| {
                with_f32(&t, |v| select_per_row(v, &shape, density)).and_then(|r| r)
            })
        })
    }

    /// `kernels.select-global`: every input and output booked before anything is copied, so
    /// passing one large tensor many times is refused by the budget instead of copied each time.
    fn select_global_handles(
        &mut self,
        scores: &[Resource<TensorHandle>],
        density: f64,
    ) -> wasmtime::Result<Result<Vec<Resource<Mask>>, String>> {
        let what = "select-global";
        let mut tensors = Vec::with_capacity(scores.len());
        for r in scores {
            tensors.push(self.tensor(r)?.clone());
        }
        let counts: Vec<usize> = tensors.iter().map(Tensor::elem_count).collect();
        let total = match budget::sum(&counts, what) {
            Ok(t) => t,
            Err(e) => return Ok(Err(e.into())),
        };
        // Results: one mask (flags + handle) per input.
        let results: usize = counts
            .iter()
            .fold(0usize, |acc, &n| acc.saturating_add(budget::mask_bytes(n)));
        // Scratch: the concatenated scores, the ranking's keys and flags, the input list.
        let scratch = total
            .saturating_mul(4)
            .saturating_add(ops::top_k_scratch_bytes(total))
            .saturating_add(total)
            .saturating_add(tensors.len().saturating_mul(64));
        let booked = results.saturating_add(scratch);
        if let Err(e) = self.budget.book(booked, what) {
            return Ok(Err(e.into()));
        }
        let masks = (|| {
            let mut all = Vec::with_capacity(total);
            for t in &tensors {
                with_f32(t, |v| all.extend_from_slice(v))?;
            }
            let shapes: Vec<&[usize]> = tensors.iter().map(|t| t.dims()).collect();
            ops::select_global(&all, &shapes, density)
        })();
        self.budget.release(scratch);
        match masks {
            Ok(masks) => {
                let mut out = Vec::with_capacity(masks.len());
                for m in masks {
                    out.push(self.table.push(m)?);
                }
                Ok(Ok(out))
            }
            Err(e) => {
                self.budget.release(results);
                Ok(Err(e))
            }
        }
    }

    /// `calibration.info`, for every version that has it.
    fn calibration_info(&self) -> Option<(u32, u32)> {
        self.model
            .calibration
            .as_ref()
            .map(|c| (c.samples() as u32, c.seq_len() as u32))
    }

    /// A calibration statistic as a handle sharing the cached storage, like a model weight: only
    /// the handle is booked. The statistics themselves are computed once per model state and
    /// sized by the model and the pipeline's calibration settings, not by the plugin.
    fn calibration_tensor(
        &mut self,
        get: impl FnOnce(&Calibrator) -> Result<Tensor, String>,
    ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
        self.timed(|s| {
            let tensor = match s.calibrator().and_then(|c| get(&c)) {
                Ok(t) => t,
                Err(e) => return Ok(Err(e)),
            };
            s.push_shared(tensor)
        })
    }

    /// One loss trial with masks the plugin holds. The request is checked whole (known layers,
    /// each once, masks of the weight's shape) before anything is copied; the masked copies of
    /// the changed weights are booked for the trial.
    fn loss_trial(
        &mut self,
        changes: Vec<(String, Resource<Mask>)>,
    ) -> wasmtime::Result<Result<f64, String>> {
        self.timed(|s| {
            let mut seen = std::collections::BTreeSet::new();
            let mut scratch = 0usize;
            for (layer, mask) in &changes {
                let Some(weight) = s.model.weights.get(layer) else {
                    return Ok(Err(format!(
                        "the model has no weight named `{}`",
                        crate::display_safe::name(layer)
                    )));
                };
                if !seen.insert(layer.as_str()) {
                    return Ok(Err(format!("`{layer}` is changed twice in one trial")));
                }
                let mask = s.mask(mask)?;
                if mask.shape() != weight.dims() {
                    return Ok(Err(format!(
                        "mask of shape {} for `{layer}` of shape {:?}",
                        budget::short_shape(mask.shape()),
                        weight.dims()
                    )));
                }
                scratch = scratch.saturating_add(weight.elem_count().saturating_mul(4));
            }
            let calibrator = match s.calibrator() {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            };
            if let Err(e) = s.budget.book(scratch, "a loss trial's masked weights") {
                return Ok(Err(e.into()));
            }
            let mut refs = Vec::with_capacity(changes.len());
            for (layer, mask) in &changes {
                refs.push((layer.as_str(), s.table.get(mask)?));
            }
            let r = calibrator.loss_with_masks(&refs);
            s.budget.release(scratch);
            Ok(r)
        })
    }
}

/// Implements one version's `calibration` interface: the functions 0.2 introduced, plus
/// `$extra` (what later versions added). Every body delegates to a shared `PluginState` method.
macro_rules! impl_calibration {
    ($cal:ident, extra: { $($extra:tt)* }) => {
        impl $cal::Host for PluginState {
            fn info(&mut self) -> wasmtime::Result<Option<$cal::CalibrationInfo>> {
                Ok(self
                    .calibration_info()
                    .map(|(samples, seq_len)| $cal::CalibrationInfo { samples, seq_len }))
            }

            fn activation_norms(
                &mut self,
                layer: String,
            ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
                self.calibration_tensor(|c| c.activation_norms(&layer))
            }

            fn loss(&mut self) -> wasmtime::Result<Result<f64, String>> {
                self.timed(|s| Ok(s.calibrator().and_then(|c| c.loss())))
            }

            fn loss_with_mask(
                &mut self,
                layer: String,
                mask: Resource<Mask>,
            ) -> wasmtime::Result<Result<f64, String>> {
                self.loss_trial(vec![(layer, mask)])
            }

            $($extra)*
        }
    };
}

impl_calibration!(calibration_v2, extra: {});

/// The `calibration` functions 0.3 added (`loss-with-masks`, `gradients`, `fisher`), for 0.3
/// and every later version.
macro_rules! calibration_since_v0_3 {
    () => {
        fn loss_with_masks(
            &mut self,
            changes: Vec<(String, Resource<Mask>)>,
        ) -> wasmtime::Result<Result<f64, String>> {
            self.loss_trial(changes)
        }

        fn gradients(
            &mut self,
            layer: String,
        ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
            self.calibration_tensor(|c| c.gradients(&layer))
        }

        fn fisher(
            &mut self,
            layer: String,
        ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
            self.calibration_tensor(|c| c.fisher(&layer))
        }
    };
}

impl_calibration!(calibration_v3, extra: { calibration_since_v0_3!(); });
impl_calibration!(calibration_v4, extra: { calibration_since_v0_3!(); });
impl_calibration!(calibration_v5, extra: { calibration_since_v0_3!(); });
impl_calibration!(calibration_v6, extra: { calibration_since_v0_3!(); });

/// `progress.report` (0.4.0): filtered by the call's [`ProgressGate`] (bounded, never blocks,
/// never fails), or ignored when nobody watches this call. Not timed as host time: it is the
/// guest's bookkeeping, not a kernel.
impl progress_v4::Host for PluginState {
    fn report(&mut self, done: u64, total: u64, message: String) -> wasmtime::Result<()> {
        if let Some(gate) = &mut self.progress {
            gate.offer(done, total, &message);
        }
        Ok(())
    }
}

impl progress_v5::Host for PluginState {
    fn report(&mut self, done: u64, total: u64, message: String) -> wasmtime::Result<()> {
        progress_v4::Host::report(self, done, total, message)
    }
}

impl progress_v6::Host for PluginState {
    fn report(&mut self, done: u64, total: u64, message: String) -> wasmtime::Result<()> {
        progress_v4::Host::report(self, done, total, message)
    }
}

impl PluginState {
    /// The calibrator of this model state, or the error a plugin sees when there is none.
    fn calibrator(&self) -> Result<Arc<Calibrator>, String> {
        self.model.calibration.clone().ok_or_else(|| {
            "this pipeline has no calibration data (add a [calibration] section)".to_string()
        })
    }
}
