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
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::random::Deterministic;
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};

use super::bindings::v0_2::espalier::prune::calibration as calibration_v2;
use super::bindings::v0_3::espalier::prune::{calibration as calibration_v3, model as model_v3};
use crate::calibration::Calibrator;
use crate::mask::{Mask, Structure};
use crate::ops;
use crate::tensor_util::{tensor_from, with_f32};

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
    pub info: model_v3::ModelInfo,
    /// Every weight, as plugins see it.
    pub layers: Vec<model_v3::LayerInfo>,
    /// Current (masked) weights by name.
    pub weights: BTreeMap<String, Tensor>,
    /// Masks of earlier stages by layer name.
    pub masks: BTreeMap<String, Mask>,
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

/// Bytes of guest stdout/stderr kept for the log; a plugin printing more traps.
const OUTPUT_CAPACITY: usize = 1 << 20;

/// Most elements one `read` may copy into the guest (64 Mi floats = 256 MiB).
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
    /// Enforces the guest memory cap.
    pub limits: StoreLimits,
    limit_config: Limits,
    model: Arc<ModelView>,
    /// Bytes of host tensors currently held for the plugin.
    host_bytes: usize,
    /// Time spent inside host imports (kernels, reads), to separate guest time from host time.
    pub host_time: Duration,
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
        let store_limits = StoreLimitsBuilder::new()
            .memory_size(limits.guest_memory)
            .instances(64)
            .memories(64)
            .tables(64)
            .table_elements(1 << 20)
            .trap_on_grow_failure(true)
            .build();
        PluginState {
            table: ResourceTable::new(),
            wasi,
            stdout,
            stderr,
            limits: store_limits,
            limit_config: limits,
            model,
            host_bytes: 0,
            host_time: Duration::ZERO,
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
        Ok(self.table.delete(mask)?)
    }

    fn tensor(&self, r: &Resource<TensorHandle>) -> wasmtime::Result<&Tensor> {
        Ok(&self.table.get(r)?.tensor)
    }

    fn mask(&self, r: &Resource<Mask>) -> wasmtime::Result<&Mask> {
        Ok(self.table.get(r)?)
    }

    /// Stores a tensor the host allocated for the plugin, within the host byte budget.
    fn push_new(&mut self, t: Tensor) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
        let bytes = t.elem_count() * 4;
        if self.host_bytes + bytes > self.limit_config.host_memory {
            return Ok(Err(format!(
                "host tensor budget of {} MiB exhausted (drop handles you no longer need)",
                self.limit_config.host_memory >> 20
            )));
        }
        self.host_bytes += bytes;
        Ok(Ok(self.table.push(TensorHandle {
            tensor: t,
            booked: bytes,
        })?))
    }

    fn push_mask(&mut self, m: Mask) -> wasmtime::Result<Resource<Mask>> {
        Ok(self.table.push(m)?)
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

fn to_usize(shape: &[u32]) -> Vec<usize> {
    shape.iter().map(|&d| d as usize).collect()
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
/// `$info` convert the 0.3 model descriptions the view holds; `kernels_extra` adds the kernels
/// a version introduced.
macro_rules! impl_host_imports {
    ($module:ident, $v:ident, layer: $layer:path, info: $info:path, kernels_extra: { $($kernels_extra:tt)* }) => {
    mod $module {
        use super::*;
        use crate::plugin::bindings::$v::espalier::prune::{kernels, model, plugin_types, tensors};

        /// WIT structure → host structure, refusing degenerate group sizes.
        fn structure_from_wit(s: kernels::Structure) -> Result<Structure, String> {
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
                    let t = s.tensor(&t)?;
                    let numel = t.elem_count() as u64;
                    let count = u64::from(count);
                    if count > MAX_READ {
                        return Ok(Err(format!(
                            "read of {count} elements exceeds the {MAX_READ} limit; read in chunks"
                        )));
                    }
                    let Some(end) = offset.checked_add(count).filter(|&e| e <= numel) else {
                        return Ok(Err(format!(
                            "read of {count} elements at offset {offset} is outside a tensor of {numel}"
                        )));
                    };
                    Ok(with_f32(t, |v| v[offset as usize..end as usize].to_vec()))
                })
            }

            fn read_rows(
                &mut self,
                t: Resource<TensorHandle>,
                start: u32,
                count: u32,
            ) -> wasmtime::Result<Result<Vec<f32>, String>> {
                self.timed(|s| {
                    let t = s.tensor(&t)?;
                    let [rows, cols] = t.dims() else {
                        return Ok(Err(format!(
                            "read-rows needs a 2-D tensor, this one has shape {:?}",
                            t.dims()
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
                    if count * cols > MAX_READ {
                        return Ok(Err(format!(
                            "read of {} elements exceeds the {MAX_READ} limit; read fewer rows",
                            count * cols
                        )));
                    }
                    Ok(with_f32(t, |v| {
                        v[(start * cols) as usize..((start + count) * cols) as usize].to_vec()
                    }))
                })
            }

            fn drop(&mut self, t: Resource<TensorHandle>) -> wasmtime::Result<()> {
                let handle = self.table.delete(t)?;
                self.host_bytes = self.host_bytes.saturating_sub(handle.booked);
                Ok(())
            }
        }

        impl tensors::Host for PluginState {
            fn from_f32(
                &mut self,
                shape: Vec<u32>,
                data: Vec<f32>,
            ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
                let shape = to_usize(&shape);
                let numel: usize = shape.iter().product();
                if numel != data.len() {
                    return Ok(Err(format!(
                        "shape {shape:?} needs {numel} values, got {}",
                        data.len()
                    )));
                }
                match tensor_from(data, &shape) {
                    Ok(t) => self.push_new(t),
                    Err(e) => Ok(Err(e)),
                }
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
                self.table.delete(m)?;
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
                    let t = s.tensor(&t)?;
                    let f: fn(f32) -> f32 = match op {
                        kernels::UnaryOp::Abs => f32::abs,
                        kernels::UnaryOp::Square => |x| x * x,
                        kernels::UnaryOp::Sqrt => f32::sqrt,
                        kernels::UnaryOp::Neg => |x| -x,
                        kernels::UnaryOp::Log => f32::ln,
                        kernels::UnaryOp::Exp => f32::exp,
                    };
                    let out = map_f32(t, f).map_err(wasmtime::Error::msg)?;
                    // A unary op cannot fail for the guest; a full host budget is a trap.
                    s.push_new(out)?.map_err(wasmtime::Error::msg)
                })
            }

            fn binary(
                &mut self,
                op: kernels::BinaryOp,
                a: Resource<TensorHandle>,
                b: Resource<TensorHandle>,
            ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
                self.timed(|s| {
                    let (a, b) = (s.tensor(&a)?, s.tensor(&b)?);
                    let r = match op {
                        kernels::BinaryOp::Add => a.broadcast_add(b),
                        kernels::BinaryOp::Sub => a.broadcast_sub(b),
                        kernels::BinaryOp::Mul => a.broadcast_mul(b),
                        kernels::BinaryOp::Div => a.broadcast_div(b),
                        kernels::BinaryOp::Maximum => a.broadcast_maximum(b),
                        kernels::BinaryOp::Minimum => a.broadcast_minimum(b),
                    };
                    match r {
                        Ok(t) => s.push_new(t),
                        Err(e) => Ok(Err(format!(
                            "cannot broadcast shapes {:?} and {:?}: {e}",
                            a.dims(),
                            b.dims()
                        ))),
                    }
                })
            }

            fn scale(
                &mut self,
                t: Resource<TensorHandle>,
                factor: f32,
            ) -> wasmtime::Result<Resource<TensorHandle>> {
                self.timed(|s| {
                    let out = map_f32(s.tensor(&t)?, |x| x * factor).map_err(wasmtime::Error::msg)?;
                    s.push_new(out)?.map_err(wasmtime::Error::msg)
                })
            }

            fn reduce(
                &mut self,
                op: kernels::ReduceOp,
                t: Resource<TensorHandle>,
                axis: u32,
            ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
                self.timed(|s| {
                    let t = s.tensor(&t)?;
                    let axis = axis as usize;
                    if axis >= t.rank() {
                        return Ok(Err(format!(
                            "axis {axis} is out of range for shape {:?}",
                            t.dims()
                        )));
                    }
                    let r = match op {
                        kernels::ReduceOp::Sum => t.sum_keepdim(axis),
                        kernels::ReduceOp::Mean => t.mean_keepdim(axis),
                        kernels::ReduceOp::Max => t.max_keepdim(axis),
                        kernels::ReduceOp::Min => t.min_keepdim(axis),
                    };
                    match r {
                        Ok(t) => s.push_new(t),
                        Err(e) => Ok(Err(e.to_string())),
                    }
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
                    let t = s.tensor(&t)?;
                    let shape = t.dims().to_vec();
                    let r = with_f32(t, |v| ops::group_norms(v, &shape, structure, p))
                        .and_then(|r| r)
                        .and_then(|(vals, grid)| tensor_from(vals, &grid));
                    match r {
                        Ok(t) => s.push_new(t),
                        Err(e) => Ok(Err(e)),
                    }
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
                    let t = s.tensor(&scores)?;
                    let shape = t.dims().to_vec();
                    match with_f32(t, |v| ops::select(v, &shape, structure, density)).and_then(|r| r) {
                        Ok(m) => Ok(Ok(s.push_mask(m)?)),
                        Err(e) => Ok(Err(e)),
                    }
                })
            }

            fn select_global(
                &mut self,
                scores: Vec<Resource<TensorHandle>>,
                density: f64,
            ) -> wasmtime::Result<Result<Vec<Resource<Mask>>, String>> {
                self.timed(|s| {
                    let tensors: Vec<Tensor> = scores
                        .iter()
                        .map(|r| s.tensor(r).cloned())
                        .collect::<wasmtime::Result<_>>()?;
                    // Contiguous f32 copies only where needed; model weights are already contiguous.
                    let datas: Vec<Vec<f32>> = match tensors
                        .iter()
                        .map(|t| with_f32(t, |v| v.to_vec()))
                        .collect::<Result<_, _>>()
                    {
                        Ok(d) => d,
                        Err(e) => return Ok(Err(e)),
                    };
                    let inputs: Vec<(&[f32], &[usize])> = datas
                        .iter()
                        .zip(&tensors)
                        .map(|(d, t)| (d.as_slice(), t.dims()))
                        .collect();
                    match ops::select_global(&inputs, density) {
                        Ok(masks) => {
                            let mut out = Vec::with_capacity(masks.len());
                            for m in masks {
                                out.push(s.push_mask(m)?);
                            }
                            Ok(Ok(out))
                        }
                        Err(e) => Ok(Err(e)),
                    }
                })
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
                    let keep = keep.into_iter().map(|b| b != 0).collect();
                    match Mask::new(to_usize(&shape), keep, structure) {
                        Ok(m) => Ok(Ok(s.push_mask(m)?)),
                        Err(e) => Ok(Err(e)),
                    }
                })
            }

            fn mask_and(
                &mut self,
                a: Resource<Mask>,
                b: Resource<Mask>,
            ) -> wasmtime::Result<Result<Resource<Mask>, String>> {
                self.timed(|s| match s.mask(&a)?.and(s.mask(&b)?) {
                    Ok(m) => Ok(Ok(s.push_mask(m)?)),
                    Err(e) => Ok(Err(e)),
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
                match self.model.weights.get(&name) {
                    // Shares the model's storage: not booked against the host budget.
                    Some(t) => Ok(Ok(self.table.push(TensorHandle {
                        tensor: t.clone(),
                        booked: 0,
                    })?)),
                    None => Ok(Err(format!("the model has no weight named `{name}`"))),
                }
            }

            fn current_mask(&mut self, name: String) -> wasmtime::Result<Option<Resource<Mask>>> {
                match self.model.masks.get(&name).cloned() {
                    Some(m) => Ok(Some(self.push_mask(m)?)),
                    None => Ok(None),
                }
            }
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
    }
);

impl PluginState {
    /// `kernels.select-per-row` (0.2 and later).
    fn select_per_row_handle(
        &mut self,
        scores: &Resource<TensorHandle>,
        density: f64,
    ) -> wasmtime::Result<Result<Resource<Mask>, String>> {
        self.timed(|s| {
            let t = s.tensor(scores)?;
            let shape = t.dims().to_vec();
            match with_f32(t, |v| select_per_row(v, &shape, density)).and_then(|r| r) {
                Ok(m) => Ok(Ok(s.push_mask(m)?)),
                Err(e) => Ok(Err(e)),
            }
        })
    }

    /// `calibration.info`, for every version that has it.
    fn calibration_info(&self) -> Option<(u32, u32)> {
        self.model
            .calibration
            .as_ref()
            .map(|c| (c.samples() as u32, c.seq_len() as u32))
    }

    /// A calibration statistic as a handle sharing the cached storage, like a model weight: not
    /// booked against the plugin's host budget.
    fn calibration_tensor(
        &mut self,
        get: impl FnOnce(&Calibrator) -> Result<Tensor, String>,
    ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
        self.timed(|s| {
            let tensor = match s.calibrator().and_then(|c| get(&c)) {
                Ok(t) => t,
                Err(e) => return Ok(Err(e)),
            };
            Ok(Ok(s.table.push(TensorHandle { tensor, booked: 0 })?))
        })
    }

    /// One loss trial with masks the plugin holds.
    fn loss_trial(
        &mut self,
        changes: Vec<(String, Resource<Mask>)>,
    ) -> wasmtime::Result<Result<f64, String>> {
        self.timed(|s| {
            let mut owned = Vec::with_capacity(changes.len());
            for (layer, mask) in &changes {
                owned.push((layer.clone(), s.mask(mask)?.clone()));
            }
            Ok(s.calibrator().and_then(|c| c.loss_with_masks(&owned)))
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

impl_calibration!(calibration_v3, extra: {
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

    fn fisher(&mut self, layer: String) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
        self.calibration_tensor(|c| c.fisher(&layer))
    }
});

impl PluginState {
    /// The calibrator of this model state, or the error a plugin sees when there is none.
    fn calibrator(&self) -> Result<Arc<Calibrator>, String> {
        self.model.calibration.clone().ok_or_else(|| {
            "this pipeline has no calibration data (add a [calibration] section)".to_string()
        })
    }
}
