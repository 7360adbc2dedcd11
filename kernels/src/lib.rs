//! Native compute for pruned weights: sparse formats built from masks and CPU kernels.
