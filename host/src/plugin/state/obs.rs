//! The host side of the `obs` interface (0.5.0, unchanged in 0.6.0): Hessian handles and Optimal Brain Surgeon
//! updates on [`PluginState`], delegating the algebra to [`crate::obs`].
//!
//! A Hessian handle shares the calibrator's cached matrix (only the handle is booked). The
//! damped inverse factor of an input is computed once per damping and kept for the rest of the
//! call in a [`FactorCache`] (q/k/v and gate/up read the same input and share it), booked
//! against the plugin's host budget like a tensor. An update holds its own copy of the weights
//! and its block of pending errors, booked until it is finished or dropped.

use std::sync::Arc;

use wasmtime::component::Resource;

use super::{PluginState, TensorHandle};
use crate::mask::Mask;
use crate::obs::{Hessian, InverseFactor, ObsUpdate, inverse_factor};
use crate::plugin::budget::{self, HANDLE_BYTES};
use crate::tensor_util::{tensor_from, with_f32};

/// A plugin's handle on one layer's input Hessian.
pub struct HessianHandle {
    /// The layer it was asked for (named in errors).
    layer: String,
    hessian: Arc<Hessian>,
}

/// A plugin's OBS update in progress.
pub struct UpdateHandle {
    update: ObsUpdate,
    /// The decisions so far (`true` = removed), `[rows, cols]`.
    removed: Vec<bool>,
    /// Bytes booked for it (weights, pending errors, the handle).
    booked: usize,
}

/// Inverse factors computed during one call, by input (the calibrator's shared `Arc`) and
/// damping asked for.
#[derive(Default)]
pub struct FactorCache {
    entries: Vec<(Arc<Hessian>, u64, Arc<InverseFactor>)>,
}

impl FactorCache {
    fn get(&self, h: &Arc<Hessian>, damping: f64) -> Option<Arc<InverseFactor>> {
        self.entries
            .iter()
            .find(|(k, d, _)| Arc::ptr_eq(k, h) && *d == damping.to_bits())
            .map(|(_, _, f)| f.clone())
    }
}

impl PluginState {
    /// The damped inverse factor of `h`, from the cache or computed (and booked) now.
    fn factor(
        &mut self,
        layer: &str,
        h: &Arc<Hessian>,
        damping: f64,
    ) -> Result<Arc<InverseFactor>, String> {
        if let Some(f) = self.factors.get(h, damping) {
            return Ok(f);
        }
        let cols = h.cols();
        // The factor itself stays (f32), the f64 working copies are scratch.
        let keep = budget::bytes_of(cols.saturating_mul(cols), 4, "an inverse Hessian")
            .map_err(|e| e.to_string())?;
        let scratch = budget::bytes_of(cols.saturating_mul(cols), 24, "an inverse Hessian")
            .map_err(|e| e.to_string())?;
        self.budget
            .book(keep, "an inverse Hessian")
            .map_err(|e| e.to_string())?;
        let made = self
            .budget
            .with_scratch(scratch, "an inverse Hessian", || {
                inverse_factor(&h.mean(), cols, damping, h.tokens(), layer)
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| e.to_string())
            .and_then(|r| r);
        let factor = match made {
            Ok(f) => Arc::new(f),
            Err(e) => {
                self.budget.release(keep);
                return Err(e);
            }
        };
        if factor.damping() > damping {
            tracing::warn!(
                layer = %crate::display_safe::name(layer),
                "the Hessian of `{}` needed damping {} (asked {damping}) to be inverted; more calibration data would help",
                crate::display_safe::name(layer),
                factor.damping()
            );
        }
        self.factors
            .entries
            .push((h.clone(), damping.to_bits(), factor.clone()));
        Ok(factor)
    }

    fn update_ref(&self, u: &Resource<UpdateHandle>) -> wasmtime::Result<&ObsUpdate> {
        Ok(&self.table.get(u)?.update)
    }

    /// `columns` / `scores`: a `[rows, end − start]` host tensor computed by `f`.
    fn update_slice(
        &mut self,
        u: &Resource<UpdateHandle>,
        start: u32,
        end: u32,
        what: &str,
        f: fn(&ObsUpdate, usize, usize) -> Result<Vec<f32>, crate::obs::ObsError>,
    ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
        self.timed(|s| {
            let (start, end) = (start as usize, end as usize);
            let update = s.update_ref(u)?;
            let rows = update.rows();
            if start > end || end > update.cols() {
                return Ok(Err(format!(
                    "{what}: columns {start}..{end} outside 0..{}",
                    update.cols()
                )));
            }
            let numel = rows * (end - start);
            s.new_tensor(what, numel, 0, |s| {
                let update = s.update_ref(u).map_err(|e| e.to_string())?;
                let v = f(update, start, end).map_err(|e| e.to_string())?;
                tensor_from(v, &[rows, end - start])
            })
        })
    }
}

/// Implements one version's `obs` interface (identical in 0.5 and 0.6; the generated traits
/// are distinct items) on [`PluginState`].
macro_rules! impl_obs {
    ($module:ident, $v:ident, $imports:ident) => {
        mod $module {
            use super::*;
            use crate::plugin::bindings::$v::espalier::prune::{kernels, obs};

            impl obs::HostHessian for PluginState {
                fn cols(&mut self, h: Resource<HessianHandle>) -> wasmtime::Result<u32> {
                    Ok(self.table.get(&h)?.hessian.cols() as u32)
                }

                fn tokens(&mut self, h: Resource<HessianHandle>) -> wasmtime::Result<u64> {
                    Ok(self.table.get(&h)?.hessian.tokens())
                }

                fn update(
                    &mut self,
                    h: Resource<HessianHandle>,
                    weights: Resource<TensorHandle>,
                    damping: f64,
                    blocksize: u32,
                ) -> wasmtime::Result<Result<Resource<UpdateHandle>, String>> {
                    self.timed(|s| {
                        let (layer, hessian) = {
                            let handle = s.table.get(&h)?;
                            (handle.layer.clone(), handle.hessian.clone())
                        };
                        let w = s.tensor(&weights)?.clone();
                        let cols = hessian.cols();
                        let &[rows, wcols] = w.dims() else {
                            return Ok(Err(format!(
                                "`{}`: weights of shape {:?}; an update needs [rows, {cols}]",
                                crate::display_safe::name(&layer),
                                w.dims()
                            )));
                        };
                        if wcols != cols {
                            return Ok(Err(format!(
                                "`{}`: weights of shape [{rows}, {wcols}], but the layer's inputs have {cols} columns",
                                crate::display_safe::name(&layer)
                            )));
                        }
                        if blocksize == 0 {
                            return Ok(Err("blocksize must be at least 1".into()));
                        }
                        let bs = (blocksize as usize).min(cols.max(1));
                        // Weights and pending errors (f32), the decisions (one byte each), the handle.
                        let booked = match budget::bytes_of(rows.saturating_mul(cols + bs), 4, "an OBS update")
                            .and_then(|b| budget::sum(&[b, rows.saturating_mul(cols), HANDLE_BYTES], "an OBS update"))
                        {
                            Ok(b) => b,
                            Err(e) => return Ok(Err(e.to_string())),
                        };
                        let factor = match s.factor(&layer, &hessian, damping) {
                            Ok(f) => f,
                            Err(e) => return Ok(Err(e)),
                        };
                        if let Err(e) = s.budget.book(booked, "an OBS update") {
                            return Ok(Err(e.to_string()));
                        }
                        let update = with_f32(&w, |v| v.to_vec())
                            .and_then(|v| ObsUpdate::new(&layer, v, rows, factor, bs).map_err(|e| e.to_string()));
                        match update {
                            Ok(update) => {
                                let removed = vec![false; rows * cols];
                                let pushed = s.table.push(UpdateHandle {
                                    update,
                                    removed,
                                    booked,
                                });
                                s.pushed(pushed, booked)
                            }
                            Err(e) => {
                                s.budget.release(booked);
                                Ok(Err(e))
                            }
                        }
                    })
                }

                fn drop(&mut self, h: Resource<HessianHandle>) -> wasmtime::Result<()> {
                    self.table.delete(h)?;
                    self.budget.release(HANDLE_BYTES);
                    Ok(())
                }
            }

            impl obs::HostUpdate for PluginState {
                fn rows(&mut self, u: Resource<UpdateHandle>) -> wasmtime::Result<u32> {
                    Ok(self.update_ref(&u)?.rows() as u32)
                }

                fn cols(&mut self, u: Resource<UpdateHandle>) -> wasmtime::Result<u32> {
                    Ok(self.update_ref(&u)?.cols() as u32)
                }

                fn next_column(&mut self, u: Resource<UpdateHandle>) -> wasmtime::Result<u32> {
                    Ok(self.update_ref(&u)?.next_column() as u32)
                }

                fn damping(&mut self, u: Resource<UpdateHandle>) -> wasmtime::Result<f64> {
                    Ok(self.update_ref(&u)?.damping())
                }

                fn columns(
                    &mut self,
                    u: Resource<UpdateHandle>,
                    start: u32,
                    end: u32,
                ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
                    self.update_slice(&u, start, end, "obs columns", ObsUpdate::columns)
                }

                fn scores(
                    &mut self,
                    u: Resource<UpdateHandle>,
                    start: u32,
                    end: u32,
                ) -> wasmtime::Result<Result<Resource<TensorHandle>, String>> {
                    self.update_slice(&u, start, end, "obs scores", ObsUpdate::scores)
                }

                fn process(
                    &mut self,
                    u: Resource<UpdateHandle>,
                    start: u32,
                    end: u32,
                    keep: Resource<Mask>,
                ) -> wasmtime::Result<Result<(), String>> {
                    self.timed(|s| {
                        let (start, end) = (start as usize, end as usize);
                        let (rows, cols) = {
                            let up = s.update_ref(&u)?;
                            (up.rows(), up.cols())
                        };
                        if start > end || end > cols {
                            return Ok(Err(format!(
                                "process: columns {start}..{end} outside 0..{cols}"
                            )));
                        }
                        let width = end - start;
                        let mask = s.mask(&keep)?;
                        let removed: Vec<bool> = if mask.shape() == [rows, width] {
                            mask.keep().iter().map(|&k| !k).collect()
                        } else if mask.shape() == [rows, cols] {
                            mask.keep()
                                .chunks(cols.max(1))
                                .flat_map(|row| row[start..end].iter().map(|&k| !k))
                                .collect()
                        } else {
                            return Ok(Err(format!(
                                "process: a mask of shape {} for columns {start}..{end} of a [{rows}, {cols}] layer (give [{rows}, {width}] or [{rows}, {cols}])",
                                budget::short_shape(mask.shape())
                            )));
                        };
                        let handle = s.table.get_mut(&u)?;
                        if let Err(e) = handle.update.process(start, end, &removed) {
                            return Ok(Err(e.to_string()));
                        }
                        for (r, row) in removed.chunks(width.max(1)).enumerate().take(rows) {
                            handle.removed[r * cols + start..r * cols + end].copy_from_slice(row);
                        }
                        Ok(Ok(()))
                    })
                }

                fn drop(&mut self, u: Resource<UpdateHandle>) -> wasmtime::Result<()> {
                    let handle = self.table.delete(u)?;
                    self.budget.release(handle.booked);
                    Ok(())
                }
            }

            impl obs::Host for PluginState {
                fn layer_hessian(
                    &mut self,
                    layer: String,
                ) -> wasmtime::Result<Result<Resource<HessianHandle>, String>> {
                    self.timed(|s| {
                        let hessian = match s.calibrator().and_then(|c| c.hessian(&layer)) {
                            Ok(h) => h,
                            Err(e) => return Ok(Err(e)),
                        };
                        if let Err(e) = s.budget.book(HANDLE_BYTES, "a handle") {
                            return Ok(Err(e.to_string()));
                        }
                        let pushed = s.table.push(HessianHandle { layer, hessian });
                        s.pushed(pushed, HANDLE_BYTES)
                    })
                }

                fn finish(
                    &mut self,
                    u: Resource<UpdateHandle>,
                    st: kernels::Structure,
                ) -> wasmtime::Result<Result<obs::Finished, String>> {
                    self.timed(|s| {
                        let structure = match super::super::$imports::structure_from_wit(st) {
                            Ok(x) => x,
                            Err(e) => return Ok(Err(e)),
                        };
                        let handle = s.table.delete(u)?;
                        s.budget.release(handle.booked);
                        let UpdateHandle {
                            update, removed, ..
                        } = handle;
                        let (rows, cols) = (update.rows(), update.cols());
                        let weights = match update.finish() {
                            Ok(w) => w,
                            Err(e) => return Ok(Err(e.to_string())),
                        };
                        let mask = s.new_mask("obs finish", rows * cols, 0, move |_| {
                            let keep: Vec<bool> = removed.into_iter().map(|r| !r).collect();
                            Mask::new(vec![rows, cols], keep, structure)
                        })?;
                        let mask = match mask {
                            Ok(m) => m,
                            Err(e) => return Ok(Err(e)),
                        };
                        let weights = s.new_tensor("obs finish", rows * cols, 0, move |_| {
                            tensor_from(weights, &[rows, cols])
                        })?;
                        match weights {
                            Ok(weights) => Ok(Ok(obs::Finished { weights, mask })),
                            Err(e) => {
                                let m = s.table.delete(mask)?;
                                s.budget.release(budget::mask_bytes(m.keep().len()));
                                Ok(Err(e))
                            }
                        }
                    })
                }
            }
        }
    };
}

impl_obs!(obs_v0_5, v0_5, v0_5_imports);
impl_obs!(obs_v0_6, v0_6, v0_6_imports);
