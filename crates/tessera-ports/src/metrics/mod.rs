//! The process's metrics, in Prometheus's text format.
//!
//! Services record with the [`metrics`] crate's macros (`counter!`, `histogram!`,
//! `gauge!`) under the names below; the first call to [`handle`] installs a
//! [`metrics_exporter_prometheus`] recorder for the whole process, and every HTTP server of
//! the process (the hub, a node's gateway, a coordinator's `--metrics` listener) serves
//! [`render`] at `/metrics`. Names and labels are documented in `docs/metrics.md`.
//!
//! Durations are seconds, sizes bytes. Histograms use [`SECONDS_BUCKETS`].

#[cfg(feature = "axum")]
pub mod http;

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// Hub requests: `method`, `route` (the route's pattern, e.g. `/api/v1/packages/{name}`),
/// `status` (the HTTP status code).
pub const HUB_REQUESTS: &str = "tessera_hub_requests_total";
/// Hub request latency in seconds, by `route`.
pub const HUB_REQUEST_SECONDS: &str = "tessera_hub_request_seconds";
/// Gateway requests: `method`, `route`, `status`, as for the hub.
pub const GATEWAY_REQUESTS: &str = "tessera_gateway_requests_total";
/// Gateway request latency in seconds, by `route`.
pub const GATEWAY_REQUEST_SECONDS: &str = "tessera_gateway_request_seconds";
/// Requests refused (status 4xx), by `server`, `route` and `reason` (the status's reason phrase in
/// lower case with `_`, e.g. `forbidden`, `payload_too_large`).
pub const REFUSALS: &str = "tessera_refusals_total";
/// Body bytes of accepted requests (`in`: their declared length; a refused request's body
/// is not counted) and of responses that declare a length (`out`), by `direction` and
/// `server` (`hub`, `gateway`).
pub const BYTES: &str = "tessera_bytes_total";
/// Federated rounds (or FedBuff aggregations) completed, by `strategy`.
pub const ROUNDS: &str = "tessera_rounds_total";
/// A federated round's duration in seconds (dispatch, training, aggregation and
/// evaluation), by `strategy`.
pub const ROUND_SECONDS: &str = "tessera_round_seconds";
/// Participants whose update a round aggregated.
pub const ROUND_PARTICIPANTS: &str = "tessera_round_participants";
/// Tasks of a coordinator's rounds and stages and how they ended, by `outcome` (`ok`: its
/// result was used, `failed`: a node failed it, timed out or went away).
pub const TASKS: &str = "tessera_tasks_total";
/// Tasks a node ran, by `node` (its id) and `outcome` (`ok`, `failed`).
pub const NODE_TASKS: &str = "tessera_node_tasks_total";
/// A node's task duration in seconds (fetching inputs to storing outputs), by `node`.
pub const NODE_TASK_SECONDS: &str = "tessera_node_task_seconds";
/// Calls to actors through a gateway, by `actor` and `outcome` (`ok`, `failed`).
pub const CALLS: &str = "tessera_calls_total";
/// Actor call latency in seconds, by `actor`.
pub const CALL_SECONDS: &str = "tessera_call_seconds";
/// Messages waiting in a queue when last touched through a gateway, by `queue`.
pub const QUEUE_DEPTH: &str = "tessera_queue_depth";

/// Histogram buckets for durations, in seconds: 1 ms to 5 minutes.
pub const SECONDS_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0];

/// A series not updated for this long is dropped (it comes back, from zero for a counter,
/// when it is recorded again): label values that stop occurring (a queue or an actor that
/// is gone) do not accumulate.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// How often histogram samples are folded into their buckets (the recorder keeps the raw
/// samples until then).
const UPKEEP: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use, with a thread that folds histogram
/// samples every 5 seconds and drops idle series every 10 minutes, whether or not anyone
/// scrapes. When another recorder was installed first (a program embedding Tessera with
/// its own), this one records nothing and renders an empty page.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .idle_timeout(MetricKindMask::ALL, Some(IDLE_TIMEOUT))
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
            .expect("the buckets are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed: /metrics stays empty");
        }
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
            for tick in 1u64.. {
                std::thread::sleep(UPKEEP);
                upkeep.run_upkeep();
                // Idle series are dropped when the metrics are rendered.
                if tick % 120 == 0 {
                    drop(upkeep.render());
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the metrics upkeep thread: {e}; histograms are folded only when scraped");
        }
        handle
    })
}

/// Installs the recorder (idempotent): call before anything records, so early events count.
pub fn install() {
    handle();
}

/// The metrics in Prometheus's text exposition format (version 0.0.4).
pub fn render() -> String {
    handle().render()
}

/// The reason label of a refused request: `403 Forbidden` gives `forbidden`.
pub fn reason_label(status: u16) -> String {
    let phrase = match status {
        400 => "bad request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not found",
        405 => "method not allowed",
        409 => "conflict",
        410 => "gone",
        411 => "length required",
        412 => "precondition failed",
        413 => "payload too large",
        415 => "unsupported media type",
        416 => "range not satisfiable",
        422 => "unprocessable entity",
        429 => "too many requests",
        _ => "other",
    };
    phrase.replace(' ', "_")
}

/// One HTTP request answered by `server` (`hub`, `gateway`): counts it by method, route
/// pattern and status, its latency, its body bytes, and a 4xx as a refusal by reason.
pub fn record_request(server: &'static str, method: &str, route: &str, status: u16, seconds: f64, bytes: (u64, u64)) {
    let (method, route) = (method.to_owned(), route.to_owned());
    let requests = if server == "hub" { HUB_REQUESTS } else { GATEWAY_REQUESTS };
    let latency = if server == "hub" { HUB_REQUEST_SECONDS } else { GATEWAY_REQUEST_SECONDS };
    metrics::counter!(requests, "method" => method, "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!(latency, "route" => route.clone()).record(seconds);
    if (400..500).contains(&status) {
        metrics::counter!(REFUSALS, "server" => server, "route" => route, "reason" => reason_label(status))
            .increment(1);
    }
    // A refused request's declared length was not read: only accepted bodies count.
    if status < 400 {
        metrics::counter!(BYTES, "server" => server, "direction" => "in").increment(bytes.0);
    }
    metrics::counter!(BYTES, "server" => server, "direction" => "out").increment(bytes.1);
}

#[cfg(test)]
mod tests {
    #[test]
    fn recorded_metrics_render_with_their_labels() {
        super::install();
        metrics::counter!(super::TASKS, "outcome" => "ok").increment(3);
        metrics::histogram!(super::ROUND_SECONDS, "strategy" => "fedavg").record(0.2);
        let text = super::render();
        assert!(text.contains("tessera_tasks_total{outcome=\"ok\"} 3"), "{text}");
        assert!(text.contains("tessera_round_seconds_bucket{strategy=\"fedavg\",le=\"0.25\"} 1"), "{text}");
        assert_eq!(super::reason_label(413), "payload_too_large");
    }

    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../../../docs/metrics.md");
        // Every metric name this file declares.
        let names: Vec<&str> = include_str!("mod.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("pub const ")?.split_once(": &str = \"")?.1.strip_suffix("\";"))
            .collect();
        assert!(names.len() >= 15, "{names:?}");
        for m in names {
            assert!(doc.contains(&format!("| `{m}` |")), "{m} is not in docs/metrics.md");
        }
    }
}
