//! The daemon's Prometheus metrics: what `GET /metrics` serves.
//!
//! [`Metrics`] owns a `prometheus-client` registry and typed handles to every metric; the rest of
//! the daemon records through its methods (never by metric name) and the endpoint calls
//! [`Metrics::encode`] and answers with [`CONTENT_TYPE`]. Every label takes its values from a
//! bounded set, because each distinct label combination is a time series kept forever by the
//! scraper: run states and load-failure reasons are enums, HTTP routes are the router's matched
//! templates (`/runs/{id}`, never the raw path), methods outside the standard ones become
//! `other`, and plugin names are capped at [`MAX_PLUGIN_LABELS`] distinct values (the rest are
//! counted as `other`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::RunStatus;

/// Content type of [`Metrics::encode`] (OpenMetrics text 1.0.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Content type of [`Metrics::encode_prometheus_text`] (Prometheus text 0.0.4), for scrapers that
/// do not ask for OpenMetrics.
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The most distinct plugin names the stage histogram labels; later names share `other`.
pub const MAX_PLUGIN_LABELS: usize = 256;

/// Why a plugin from a watched folder could not be loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoadFailure {
    /// The file was rejected before reading (too large, empty, not a regular file).
    Rejected,
    /// It could not be read.
    Io,
    /// Not a valid WebAssembly component, or it failed to compile.
    Compile,
    /// It compiled but does not implement the plugin interface, or `describe()` failed.
    Interface,
    /// A plugin with the same name is already loaded from elsewhere.
    Conflict,
}

impl LoadFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadFailure::Rejected => "rejected",
            LoadFailure::Io => "io",
            LoadFailure::Compile => "compile",
            LoadFailure::Interface => "interface",
            LoadFailure::Conflict => "conflict",
        }
    }
}

impl EncodeLabelValue for LoadFailure {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PluginLabels {
    plugin: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    reason: LoadFailure,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HttpLabels {
    method: &'static str,
    route: String,
    status: String,
}

/// Why encoding failed (only a formatting error from the encoder; kept typed for `?`).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode metrics: {0}")]
pub struct EncodeError(#[from] std::fmt::Error);

fn stage_histogram() -> Histogram {
    // 10 ms to ~1.5 h: a criterion on a tiny model takes milliseconds, calibration on a large
    // one tens of minutes.
    Histogram::new(exponential_buckets(0.01, 4.0, 10))
}

fn http_histogram() -> Histogram {
    // 1 ms to ~16 s: most endpoints answer in milliseconds; uploads compile a component.
    Histogram::new(exponential_buckets(0.001, 4.0, 8))
}

/// All the daemon's metrics. Share it in an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    runs: Family<StateLabels, Gauge>,
    queue_length: Gauge,
    stage_duration: Family<PluginLabels, Histogram, fn() -> Histogram>,
    plugin_load_failures: Family<FailureLabels, Counter>,
    http_duration: Family<HttpLabels, Histogram, fn() -> Histogram>,
    http_requests: Family<HttpLabels, Counter>,
    generation_running: Gauge,
    generation_waiting: Gauge,
    generations_abandoned: Counter,
    /// Plugin names already used as labels (bounded by [`MAX_PLUGIN_LABELS`]).
    plugin_names: Mutex<BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("espalier");
        let runs = Family::<StateLabels, Gauge>::default();
        registry.register("runs", "Runs in the history, by state", runs.clone());
        let queue_length = Gauge::default();
        registry.register(
            "queue_length",
            "Runs waiting for a worker",
            queue_length.clone(),
        );
        let stage_duration =
            Family::<PluginLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                stage_histogram,
            );
        registry.register(
            "stage_duration_seconds",
            "Time to run one pipeline stage, by plugin",
            stage_duration.clone(),
        );
        let plugin_load_failures = Family::<FailureLabels, Counter>::default();
        // Counters are registered without `_total`; the encoder appends it.
        registry.register(
            "plugin_load_failures",
            "Plugins from watched folders that could not be loaded, by reason",
            plugin_load_failures.clone(),
        );
        let http_duration =
            Family::<HttpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                http_histogram,
            );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by method, route template and status class",
            http_duration.clone(),
        );
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route template and status code",
            http_requests.clone(),
        );
        let generation_running = Gauge::default();
        registry.register(
            "generation_running",
            "Text generations in the running batches of the loaded models (/openai/v1)",
            generation_running.clone(),
        );
        let generation_waiting = Gauge::default();
        registry.register(
            "generation_waiting",
            "Text generations waiting to join a running batch (slots or KV-cache memory)",
            generation_waiting.clone(),
        );
        let generations_abandoned = Counter::default();
        registry.register(
            "generations_abandoned",
            "Text generations stopped because their client went away",
            generations_abandoned.clone(),
        );
        let metrics = Metrics {
            registry,
            generation_running,
            generation_waiting,
            generations_abandoned,
            runs,
            queue_length,
            stage_duration,
            plugin_load_failures,
            http_duration,
            http_requests,
            plugin_names: Mutex::new(BTreeSet::new()),
        };
        // Every state is present from the first scrape, so dashboards see zeros, not gaps.
        for status in RunStatus::ALL {
            metrics
                .runs
                .get_or_create(&StateLabels {
                    state: status.as_str(),
                })
                .set(0);
        }
        metrics
    }

    /// Sets the runs gauge from [`crate::store::RunStore::counts_by_status`]; states missing from
    /// `counts` are set to 0.
    pub fn set_runs_by_state(&self, counts: &BTreeMap<RunStatus, u64>) {
        for status in RunStatus::ALL {
            let n = counts.get(&status).copied().unwrap_or(0);
            self.runs
                .get_or_create(&StateLabels {
                    state: status.as_str(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn set_queue_length(&self, len: u64) {
        self.queue_length
            .set(i64::try_from(len).unwrap_or(i64::MAX));
    }

    /// Counts generations entering (`+1`) or leaving (`-1`) a running batch.
    pub fn add_generation_running(&self, delta: i64) {
        self.generation_running.inc_by(delta);
    }

    /// Counts generations starting (`+1`) or ending (`-1`) a wait for a batch slot.
    pub fn add_generation_waiting(&self, delta: i64) {
        self.generation_waiting.inc_by(delta);
    }

    /// Counts a generation whose client went away.
    pub fn inc_generation_abandoned(&self) {
        self.generations_abandoned.inc();
    }

    /// Records how long a pipeline stage took with `plugin`.
    pub fn observe_stage(&self, plugin: &str, duration: Duration) {
        let plugin = self.plugin_label(plugin);
        self.stage_duration
            .get_or_create(&PluginLabels { plugin })
            .observe(duration.as_secs_f64());
    }

    pub fn inc_plugin_load_failure(&self, reason: LoadFailure) {
        self.plugin_load_failures
            .get_or_create(&FailureLabels { reason })
            .inc();
    }

    /// Records one answered request. `route` is the matched route template (`/runs/{id}`), or
    /// `unmatched` when no route matched; never the raw path, whose ids would create a series
    /// per run.
    pub fn observe_http(&self, method: &str, route: &str, status: u16, duration: Duration) {
        let method = method_label(method);
        self.http_requests
            .get_or_create(&HttpLabels {
                method,
                route: route.to_owned(),
                status: status.to_string(),
            })
            .inc();
        // The histogram uses the status class: ~15 series per histogram make per-code
        // histograms costly, and latency rarely differs between codes of one class.
        self.http_duration
            .get_or_create(&HttpLabels {
                method,
                route: route.to_owned(),
                status: status_class(status).to_owned(),
            })
            .observe(duration.as_secs_f64());
    }

    /// Encodes every metric in the OpenMetrics text format (serve with [`CONTENT_TYPE`]).
    pub fn encode(&self) -> Result<String, EncodeError> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Encodes every metric in the Prometheus text format 0.0.4 (serve with
    /// [`PROMETHEUS_TEXT_CONTENT_TYPE`]).
    pub fn encode_prometheus_text(&self) -> Result<String, EncodeError> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    fn plugin_label(&self, plugin: &str) -> String {
        let mut names = match self.plugin_names.lock() {
            Ok(names) => names,
            // The set is only ever inserted into; a panic elsewhere cannot leave it inconsistent.
            Err(poisoned) => poisoned.into_inner(),
        };
        if names.contains(plugin) {
            return plugin.to_owned();
        }
        if names.len() >= MAX_PLUGIN_LABELS {
            return "other".to_owned();
        }
        names.insert(plugin.to_owned());
        plugin.to_owned()
    }
}

fn method_label(method: &str) -> &'static str {
    const METHODS: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    METHODS
        .into_iter()
        .find(|m| m.eq_ignore_ascii_case(method))
        .unwrap_or("other")
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn encodes_openmetrics_sample_lines() {
        let metrics = Metrics::new();
        metrics.set_runs_by_state(&BTreeMap::from([
            (RunStatus::Queued, 3),
            (RunStatus::Succeeded, 7),
        ]));
        metrics.set_queue_length(3);
        metrics.observe_stage("wanda", Duration::from_millis(20));
        metrics.observe_stage("wanda", Duration::from_secs(2));
        metrics.inc_plugin_load_failure(LoadFailure::Compile);
        metrics.inc_plugin_load_failure(LoadFailure::Compile);
        metrics.observe_http("get", "/runs/{id}", 200, Duration::from_millis(3));
        metrics.observe_http("GET", "/runs/{id}", 404, Duration::from_millis(1));
        metrics.observe_http("BREW", "unmatched", 404, Duration::from_millis(1));

        let text = metrics.encode().unwrap();
        let l = lines(&text);
        for expected in [
            "# TYPE espalier_runs gauge",
            "espalier_runs{state=\"queued\"} 3",
            "espalier_runs{state=\"succeeded\"} 7",
            "espalier_runs{state=\"running\"} 0",
            "espalier_runs{state=\"interrupted\"} 0",
            "# TYPE espalier_queue_length gauge",
            "espalier_queue_length 3",
            "# TYPE espalier_stage_duration_seconds histogram",
            "espalier_stage_duration_seconds_count{plugin=\"wanda\"} 2",
            "espalier_stage_duration_seconds_sum{plugin=\"wanda\"} 2.02",
            "espalier_stage_duration_seconds_bucket{le=\"0.04\",plugin=\"wanda\"} 1",
            "espalier_stage_duration_seconds_bucket{le=\"+Inf\",plugin=\"wanda\"} 2",
            "# TYPE espalier_plugin_load_failures counter",
            "espalier_plugin_load_failures_total{reason=\"compile\"} 2",
            "# TYPE espalier_http_requests counter",
            "espalier_http_requests_total{method=\"GET\",route=\"/runs/{id}\",status=\"200\"} 1",
            "espalier_http_requests_total{method=\"GET\",route=\"/runs/{id}\",status=\"404\"} 1",
            "espalier_http_requests_total{method=\"other\",route=\"unmatched\",status=\"404\"} 1",
            "espalier_http_request_duration_seconds_count{method=\"GET\",route=\"/runs/{id}\",status=\"2xx\"} 1",
            "espalier_http_request_duration_seconds_count{method=\"GET\",route=\"/runs/{id}\",status=\"4xx\"} 1",
            "# EOF",
        ] {
            assert!(l.contains(&expected), "missing {expected:?} in:\n{text}");
        }
        assert_eq!(l.last(), Some(&"# EOF"));
    }

    #[test]
    fn prometheus_text_has_no_eof_and_its_own_content_type() {
        let metrics = Metrics::new();
        metrics.set_queue_length(5);
        let text = metrics.encode_prometheus_text().unwrap();
        assert!(lines(&text).contains(&"espalier_queue_length 5"), "{text}");
        assert!(!text.contains("# EOF"));
        assert!(PROMETHEUS_TEXT_CONTENT_TYPE.starts_with("text/plain; version=0.0.4"));
        assert!(CONTENT_TYPE.starts_with("application/openmetrics-text"));
    }

    #[test]
    fn plugin_labels_are_bounded() {
        let metrics = Metrics::new();
        for i in 0..MAX_PLUGIN_LABELS + 10 {
            metrics.observe_stage(&format!("p{i}"), Duration::from_millis(1));
        }
        metrics.observe_stage("p0", Duration::from_millis(1));
        let text = metrics.encode().unwrap();
        let series = text
            .lines()
            .filter(|l| l.starts_with("espalier_stage_duration_seconds_count{"))
            .count();
        assert_eq!(series, MAX_PLUGIN_LABELS + 1, "named plugins plus `other`");
        assert!(
            text.contains("espalier_stage_duration_seconds_count{plugin=\"other\"} 10"),
            "{text}"
        );
        assert!(text.contains("espalier_stage_duration_seconds_count{plugin=\"p0\"} 2"));
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new();
        metrics.observe_stage("we\"ird\nname", Duration::from_millis(1));
        let text = metrics.encode().unwrap();
        assert!(text.contains(r#"plugin="we\"ird\nname""#), "{text}");
    }

    #[test]
    fn metrics_are_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Metrics>();
        assert_eq!(status_class(503), "5xx");
        assert_eq!(status_class(42), "other");
    }
}
