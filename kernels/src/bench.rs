//! Kernel benchmark (placeholder).
