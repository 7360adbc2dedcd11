//! Replays an arbitrary sequence of host-import calls, decoded from bytes, against a small
//! model: the host side of every `espalier:prune@0.3.0` import is called exactly as a guest
//! would call it, with arbitrary shapes, sizes, densities, structures, names and handles
//! (live, dropped and forged). The fuzz target `host_imports` feeds it bytes; the regression
//! inputs it found replay in the unit tests below.
//!
//! What must hold for every input: no panic, no abort, and the host bytes held for the
//! "plugin" never exceed its budget. A trap (what a guest sees as a crash) ends the sequence,
//! as it would end the guest.

use std::sync::{Arc, OnceLock};

use wasmtime::component::Resource;

use super::bindings::v0_4::espalier::prune::{calibration, kernels, model, tensors};
use super::state::{Limits, ModelView, PluginState, TensorHandle};
use crate::calibration::{CalibrationSet, Calibrator};
use crate::mask::Mask;

/// Host budget of a replay: small, so that over-budget paths are reached often.
pub const REPLAY_HOST_BYTES: usize = 16 << 20;
/// Guest memory cap of a replay (bounds `read`).
pub const REPLAY_GUEST_BYTES: usize = 64 << 20;
/// Most calls one input may make.
const MAX_CALLS: usize = 64;

/// The model every replay runs against: the built-in tiny LLaMA with a two-sequence
/// calibration set, built once per process (its statistics are cached across replays, as they
/// are across a stage's calls).
fn view() -> Arc<ModelView> {
    static VIEW: OnceLock<Arc<ModelView>> = OnceLock::new();
    VIEW.get_or_init(|| {
        let model = espalier_engine::load_model("builtin:tiny-llama")
            .expect("the built-in model always loads");
        let vocab = model.config.vocab_size as u32;
        let set = CalibrationSet {
            source: "replay".into(),
            sequences: (0..2)
                .map(|s| (0..16).map(|i| (i * 7 + s * 13) % vocab).collect())
                .collect(),
            text_sha256: String::new(),
        };
        let mut view = crate::run::model_view(&model, &Default::default());
        view.calibration = Some(Arc::new(Calibrator::new(model, Arc::new(set))));
        Arc::new(view)
    })
    .clone()
}

/// Reads arguments from the input; past its end every value is zero, so any input decodes.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    fn f32(&mut self) -> f32 {
        f32::from_bits(self.u32())
    }
    /// A size: mostly small, sometimes huge, sometimes extreme.
    fn size(&mut self) -> u32 {
        match self.u8() % 8 {
            0 => 0,
            1..=4 => u32::from(self.u8() % 40),
            5 => u32::from(self.u8()) * 64,
            6 => 1 << (self.u8() % 32),
            _ => self.u32(),
        }
    }
    fn density(&mut self) -> f64 {
        match self.u8() % 8 {
            0 => f64::NAN,
            1 => -1.0,
            2 => 1.5,
            3 => f64::INFINITY,
            _ => f64::from(self.u8()) / 255.0,
        }
    }
    fn shape(&mut self) -> Vec<u32> {
        let rank = self.u8() % 11;
        (0..rank).map(|_| self.size()).collect()
    }
    fn structure(&mut self) -> kernels::Structure {
        match self.u8() % 7 {
            0 => kernels::Structure::Unstructured,
            1 => kernels::Structure::Blocks(kernels::BlockShape {
                rows: self.size(),
                cols: self.size(),
            }),
            2 => kernels::Structure::NOfM(kernels::NOfM {
                n: self.size(),
                m: self.size(),
            }),
            3 => kernels::Structure::Rows,
            4 => kernels::Structure::Columns,
            5 => kernels::Structure::RowGroups(self.size()),
            _ => kernels::Structure::ColumnGroups(self.size()),
        }
    }
    fn name(&mut self, layers: &[String]) -> String {
        match self.u8() % 8 {
            0 => String::new(),
            1 => "\u{1b}]0;forged\u{7}".repeat(usize::from(self.u8())),
            2 => "x".repeat(self.u32() as usize % (1 << 20)),
            _ if !layers.is_empty() => layers[usize::from(self.u8()) % layers.len()].clone(),
            _ => "missing".into(),
        }
    }
}

/// Live handles, by the rep the table gave them; a pick may also forge a rep.
struct Handles {
    tensors: Vec<u32>,
    masks: Vec<u32>,
}

fn pick(r: &mut Reader<'_>, live: &[u32]) -> u32 {
    let b = r.u8();
    if b < 0xe0 && !live.is_empty() {
        live[usize::from(b) % live.len()]
    } else {
        // Forged: a rep the host never gave out, or one of another type, or a dropped one.
        r.u32() % 64
    }
}

fn tensor(rep: u32) -> Resource<TensorHandle> {
    Resource::new_borrow(rep)
}

fn mask(rep: u32) -> Resource<Mask> {
    Resource::new_borrow(rep)
}

/// Outcome of one replay (for tests and the fuzz target's assertions).
#[derive(Debug, Default, Clone, Copy)]
pub struct Replayed {
    /// Calls made.
    pub calls: usize,
    /// Calls that trapped (at most one: a trap ends the sequence).
    pub trapped: bool,
    /// Most host bytes held at once.
    pub peak_host_bytes: usize,
}

/// Replays the calls `data` encodes. Panics only if a host guarantee broke (the budget
/// exceeded), which is what the fuzzer and the tests look for.
pub fn replay(data: &[u8]) -> Replayed {
    use calibration::Host as _;
    use kernels::{Host as _, HostMask as _};
    use model::Host as _;
    use tensors::{Host as _, HostTensor as _};

    let view = view();
    let layers: Vec<String> = view.layers.iter().map(|l| l.name.clone()).collect();
    let mut state = PluginState::new(
        view,
        Limits {
            guest_memory: REPLAY_GUEST_BYTES,
            host_memory: REPLAY_HOST_BYTES,
        },
    );
    let mut h = Handles {
        tensors: Vec::new(),
        masks: Vec::new(),
    };
    let mut r = Reader { data, pos: 0 };
    let mut out = Replayed::default();
    while !r.done() && out.calls < MAX_CALLS {
        out.calls += 1;
        let s = &mut state;
        // Ok(Some(rep)) = a new tensor, Ok(None) = nothing new; Err = a trap.
        let result: wasmtime::Result<()> = (|| {
            match r.u8() % 24 {
                0 => {
                    let shape = r.shape();
                    let n = usize::from(r.u8()) * 4;
                    let data: Vec<f32> = (0..n).map(|_| r.f32()).collect();
                    if let Ok(t) = s.from_f32(shape, data)? {
                        h.tensors.push(t.rep());
                    }
                }
                1 => {
                    let t = pick(&mut r, &h.tensors);
                    let (offset, count) = (r.u64(), r.size());
                    let _ = s.read(tensor(t), offset, count)?;
                }
                2 => {
                    let t = pick(&mut r, &h.tensors);
                    let (start, count) = (r.size(), r.size());
                    let _ = s.read_rows(tensor(t), start, count)?;
                }
                3 => {
                    let t = pick(&mut r, &h.tensors);
                    tensors::HostTensor::drop(s, Resource::new_own(t))?;
                    h.tensors.retain(|&x| x != t);
                }
                4 => {
                    let op = match r.u8() % 6 {
                        0 => kernels::UnaryOp::Abs,
                        1 => kernels::UnaryOp::Square,
                        2 => kernels::UnaryOp::Sqrt,
                        3 => kernels::UnaryOp::Neg,
                        4 => kernels::UnaryOp::Log,
                        _ => kernels::UnaryOp::Exp,
                    };
                    let t = pick(&mut r, &h.tensors);
                    h.tensors.push(s.unary(op, tensor(t))?.rep());
                }
                5 => {
                    let op = match r.u8() % 6 {
                        0 => kernels::BinaryOp::Add,
                        1 => kernels::BinaryOp::Sub,
                        2 => kernels::BinaryOp::Mul,
                        3 => kernels::BinaryOp::Div,
                        4 => kernels::BinaryOp::Maximum,
                        _ => kernels::BinaryOp::Minimum,
                    };
                    let (a, b) = (pick(&mut r, &h.tensors), pick(&mut r, &h.tensors));
                    if let Ok(t) = s.binary(op, tensor(a), tensor(b))? {
                        h.tensors.push(t.rep());
                    }
                }
                6 => {
                    let t = pick(&mut r, &h.tensors);
                    let f = r.f32();
                    h.tensors.push(s.scale(tensor(t), f)?.rep());
                }
                7 => {
                    let op = match r.u8() % 4 {
                        0 => kernels::ReduceOp::Sum,
                        1 => kernels::ReduceOp::Mean,
                        2 => kernels::ReduceOp::Max,
                        _ => kernels::ReduceOp::Min,
                    };
                    let t = pick(&mut r, &h.tensors);
                    let axis = r.size();
                    if let Ok(t) = s.reduce(op, tensor(t), axis)? {
                        h.tensors.push(t.rep());
                    }
                }
                8 => {
                    let t = pick(&mut r, &h.tensors);
                    let (st, p) = (r.structure(), r.f32());
                    if let Ok(t) = s.group_norms(tensor(t), st, p)? {
                        h.tensors.push(t.rep());
                    }
                }
                9 => {
                    let t = pick(&mut r, &h.tensors);
                    let (st, d) = (r.structure(), r.density());
                    if let Ok(m) = s.select(tensor(t), st, d)? {
                        h.masks.push(m.rep());
                    }
                }
                10 => {
                    let n = usize::from(r.u8() % 64);
                    let list: Vec<_> = (0..n).map(|_| tensor(pick(&mut r, &h.tensors))).collect();
                    let d = r.density();
                    if let Ok(ms) = s.select_global(list, d)? {
                        h.masks.extend(ms.iter().map(Resource::rep));
                    }
                }
                11 => {
                    let t = pick(&mut r, &h.tensors);
                    let d = r.density();
                    if let Ok(m) = s.select_per_row(tensor(t), d)? {
                        h.masks.push(m.rep());
                    }
                }
                12 => {
                    let shape = r.shape();
                    let n = usize::from(r.u8()) * 8;
                    let keep: Vec<u8> = (0..n).map(|_| r.u8() % 2).collect();
                    let st = r.structure();
                    if let Ok(m) = s.mask_from_bytes(shape, keep, st)? {
                        h.masks.push(m.rep());
                    }
                }
                13 => {
                    let (a, b) = (pick(&mut r, &h.masks), pick(&mut r, &h.masks));
                    if let Ok(m) = s.mask_and(mask(a), mask(b))? {
                        h.masks.push(m.rep());
                    }
                }
                14 => {
                    let m = pick(&mut r, &h.masks);
                    kernels::HostMask::shape(s, mask(m))?;
                    s.density(mask(m))?;
                    s.kept(mask(m))?;
                    kernels::HostMask::structure(s, mask(m))?;
                }
                15 => {
                    let m = pick(&mut r, &h.masks);
                    kernels::HostMask::drop(s, Resource::new_own(m))?;
                    h.masks.retain(|&x| x != m);
                }
                16 => {
                    let name = r.name(&layers);
                    if let Ok(t) = s.weight(name)? {
                        h.tensors.push(t.rep());
                    }
                }
                17 => {
                    let name = r.name(&layers);
                    if let Some(m) = s.current_mask(name)? {
                        h.masks.push(m.rep());
                    }
                }
                18 => {
                    model::Host::info(s)?;
                    s.layers()?;
                }
                19 => {
                    let t = pick(&mut r, &h.tensors);
                    tensors::HostTensor::shape(s, tensor(t))?;
                    s.dtype(tensor(t))?;
                    s.numel(tensor(t))?;
                }
                20 => {
                    let name = r.name(&layers);
                    let got = match r.u8() % 3 {
                        0 => s.activation_norms(name)?,
                        1 => s.gradients(name)?,
                        _ => s.fisher(name)?,
                    };
                    if let Ok(t) = got {
                        h.tensors.push(t.rep());
                    }
                }
                21 => {
                    calibration::Host::info(s)?;
                    let _ = s.loss()?;
                }
                22 => {
                    let name = r.name(&layers);
                    let m = pick(&mut r, &h.masks);
                    let _ = s.loss_with_mask(name, mask(m))?;
                }
                _ => {
                    let n = usize::from(r.u8() % 8);
                    let changes: Vec<_> = (0..n)
                        .map(|_| (r.name(&layers), mask(pick(&mut r, &h.masks))))
                        .collect();
                    let _ = s.loss_with_masks(changes)?;
                }
            }
            Ok(())
        })();
        assert!(
            state.host_bytes() <= REPLAY_HOST_BYTES,
            "host bytes {} exceed the budget",
            state.host_bytes()
        );
        if result.is_err() {
            out.trapped = true;
            break;
        }
    }
    out.peak_host_bytes = state.host_peak_bytes();
    assert!(out.peak_host_bytes <= REPLAY_HOST_BYTES);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every input the fuzzer kept as a regression (crashes it found, fixed since, and inputs
    /// that reached new paths) replays without a panic and within the budget.
    #[test]
    fn fuzz_regressions_replay_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/regressions/host_imports");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            panic!("{} is missing", dir.display());
        };
        let mut n = 0;
        for e in entries.flatten() {
            let bytes = std::fs::read(e.path()).expect("readable regression input");
            replay(&bytes);
            n += 1;
        }
        assert!(n > 0, "no regression inputs in {}", dir.display());
    }

    fn fresh() -> PluginState {
        PluginState::new(
            view(),
            Limits {
                guest_memory: REPLAY_GUEST_BYTES,
                host_memory: REPLAY_HOST_BYTES,
            },
        )
    }

    fn refused<T>(r: wasmtime::Result<Result<T, String>>) -> String {
        match r {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => panic!("expected a refusal"),
            Err(e) => panic!("expected a refusal, got a trap: {e:#}"),
        }
    }

    use kernels::Host as _;
    use model::Host as _;
    use tensors::Host as _;

    #[test]
    fn a_broadcast_result_is_booked_before_it_is_allocated() {
        // [1, n] by [n, 1]: a 16 GiB result from two 256 KiB inputs.
        let mut s = fresh();
        let n = 1u32 << 16;
        let row = s
            .from_f32(vec![1, n], vec![1.0; n as usize])
            .unwrap()
            .unwrap();
        let col = s
            .from_f32(vec![n, 1], vec![1.0; n as usize])
            .unwrap()
            .unwrap();
        let e = refused(s.binary(kernels::BinaryOp::Mul, tensor(row.rep()), tensor(col.rep())));
        assert!(e.contains("host tensor budget"), "{e}");
        assert!(s.host_peak_bytes() <= REPLAY_HOST_BYTES);
    }

    #[test]
    fn shapes_whose_size_overflows_are_refused() {
        let mut s = fresh();
        // 2^64 elements wraps to 0 in unchecked arithmetic, which would match empty data.
        let e = refused(s.from_f32(vec![1 << 16; 4], vec![]));
        assert!(e.contains("overflows") || e.contains("dimensions"), "{e}");
        let e = refused(s.mask_from_bytes(
            vec![u32::MAX, u32::MAX, 2],
            vec![],
            kernels::Structure::Rows,
        ));
        assert!(e.contains("overflows"), "{e}");
        // An empty tensor whose reduction would be huge: [0, 2^31] reduced over axis 0.
        let t = s.from_f32(vec![0, 1 << 31], vec![]).unwrap().unwrap();
        let e = refused(s.reduce(kernels::ReduceOp::Sum, tensor(t.rep()), 0));
        assert!(e.contains("empty") || e.contains("budget"), "{e}");
        // Reducing a non-empty axis of an empty tensor leaves an empty result: refused or
        // empty, never a panic.
        let t = s.from_f32(vec![2, 1 << 31, 0], vec![]).unwrap().unwrap();
        match s
            .reduce(kernels::ReduceOp::Max, tensor(t.rep()), 0)
            .unwrap()
        {
            Ok(r) => assert_eq!(
                tensors::HostTensor::numel(&mut s, tensor(r.rep())).unwrap(),
                0
            ),
            Err(e) => assert!(e.contains("empty"), "{e}"),
        }
    }

    #[test]
    fn masks_are_booked_and_released() {
        let mut s = fresh();
        let name = view()
            .layers
            .iter()
            .find(|l| l.shape.len() == 2)
            .unwrap()
            .name
            .clone();
        let w = s.weight(name).unwrap().unwrap();
        // Hoarding masks ends at the budget ...
        let mut held = Vec::new();
        let err = loop {
            match s
                .select(tensor(w.rep()), kernels::Structure::Unstructured, 0.5)
                .unwrap()
            {
                Ok(m) => held.push(m.rep()),
                Err(e) => break e,
            }
            assert!(held.len() < 100_000, "masks are not booked");
        };
        assert!(err.contains("host tensor budget"), "{err}");
        // ... and dropping them gives the bytes back.
        for rep in held {
            kernels::HostMask::drop(&mut s, Resource::new_own(rep)).unwrap();
        }
        assert!(
            s.host_bytes() < 4096,
            "{} bytes still booked",
            s.host_bytes()
        );
        for _ in 0..1000 {
            let m = s
                .select(tensor(w.rep()), kernels::Structure::Unstructured, 0.5)
                .unwrap()
                .unwrap();
            kernels::HostMask::drop(&mut s, Resource::new_own(m.rep())).unwrap();
        }
    }

    #[test]
    fn select_global_books_every_copy_of_a_repeated_tensor() {
        let mut s = fresh();
        let big = view()
            .layers
            .iter()
            .max_by_key(|l| l.shape.iter().product::<u32>())
            .unwrap()
            .name
            .clone();
        let w = s.weight(big).unwrap().unwrap();
        let list: Vec<_> = (0..20_000).map(|_| tensor(w.rep())).collect();
        let e = refused(s.select_global(list, 0.5));
        assert!(e.contains("host tensor budget"), "{e}");
        assert!(s.host_peak_bytes() <= REPLAY_HOST_BYTES);
    }

    #[test]
    fn empty_masks_under_every_structure_do_not_panic() {
        let mut s = fresh();
        for shape in [vec![0, 4], vec![4, 0], vec![0, 0], vec![0]] {
            for st in [
                kernels::Structure::Rows,
                kernels::Structure::Columns,
                kernels::Structure::RowGroups(2),
                kernels::Structure::ColumnGroups(2),
                kernels::Structure::Blocks(kernels::BlockShape { rows: 2, cols: 2 }),
                kernels::Structure::NOfM(kernels::NOfM { n: 2, m: 4 }),
            ] {
                let _ = s.mask_from_bytes(shape.clone(), vec![], st).unwrap();
                let t = s.from_f32(shape.clone(), vec![]).unwrap().unwrap();
                let _ = s.select(tensor(t.rep()), st, 0.5).unwrap();
                let _ = s.group_norms(tensor(t.rep()), st, 2.0).unwrap();
            }
        }
    }

    #[test]
    fn loss_trials_check_the_request_before_copying() {
        use calibration::Host as _;
        let mut s = fresh();
        let l = view()
            .layers
            .iter()
            .find(|l| l.block == Some(0) && l.shape.len() == 2)
            .unwrap()
            .clone();
        let w = s.weight(l.name.clone()).unwrap().unwrap();
        let m = s
            .select(tensor(w.rep()), kernels::Structure::Unstructured, 0.5)
            .unwrap()
            .unwrap();
        let twice = vec![
            (l.name.clone(), mask(m.rep())),
            (l.name.clone(), mask(m.rep())),
        ];
        assert!(refused(s.loss_with_masks(twice)).contains("twice"));
        let unknown = vec![("nope".to_string(), mask(m.rep()))];
        assert!(refused(s.loss_with_masks(unknown)).contains("no weight"));
        // A forged mask handle traps (what the guest sees as a crash), never panics.
        assert!(s.loss_with_mask(l.name.clone(), mask(9999)).is_err());
        let ok = s.loss_with_mask(l.name, mask(m.rep())).unwrap();
        assert!(ok.unwrap().is_finite());
    }

    #[test]
    fn weight_handles_are_booked_so_hoarding_them_ends() {
        let mut s = fresh();
        let name = view().layers[0].name.clone();
        let mut n = 0;
        loop {
            match s.weight(name.clone()) {
                Ok(Ok(_)) => n += 1,
                Ok(Err(e)) => {
                    assert!(e.contains("budget"), "{e}");
                    break;
                }
                // The resource table's own cap may come first: a trap, not a panic.
                Err(_) => break,
            }
            assert!(n <= REPLAY_HOST_BYTES / super::super::budget::HANDLE_BYTES + 1);
        }
    }
}
