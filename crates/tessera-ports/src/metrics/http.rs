//! For axum servers (feature `axum`): `/metrics`, and the middleware that measures every
//! routed request. Add it with `route_layer`, so the route pattern is known.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

/// Records the request in the process's metrics ([`super::record_request`]) under
/// `server`, labelled by its route pattern (never the path itself: a path holds names).
pub async fn measure(server: &'static str, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().to_string();
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let bytes_in = content_length(req.headers());
    let response = next.run(req).await;
    let bytes_out = content_length(response.headers());
    super::record_request(
        server,
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
        (bytes_in, bytes_out),
    );
    response
}

fn content_length(headers: &axum::http::HeaderMap) -> u64 {
    headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0)
}

/// `GET /metrics`: the process's metrics in Prometheus's text format.
pub async fn metrics_page() -> ([(axum::http::HeaderName, &'static str); 1], String) {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], super::render())
}
