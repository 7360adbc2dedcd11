//! `espalier serve`, the Espalier daemon: a thin front end over the `espalier` core, like the
//! CLI. `daemon.rs` holds the state and the work (runs on runner threads, the registry fed by
//! the watched plugin folder and uploads, watched pipelines); `api.rs` is the REST layer;
//! `store.rs` keeps run records and the queue (SQLite behind one trait); `watch.rs` reports
//! complete files of a watched folder; `metrics.rs` is the Prometheus side; `openai.rs` the OpenAI-compatible text
//! generation API under `/openai/v1`, batched by `batch.rs` (one continuous-batching scheduler
//! per loaded model); `dashboard.rs` serves the web page
//! (files in `server/dashboard/`, compiled in); `layout.rs` the state
//! folder and the rule that keeps requests inside it; `config.rs` the settings; `serve.rs`
//! ties them to a listener and signals.

pub mod api;
pub mod batch;
pub mod config;
pub mod daemon;
pub mod dashboard;
pub mod layout;
pub mod logprobs;
pub mod metrics;
pub mod openai;
pub mod serve;
pub mod store;
pub mod watch;
