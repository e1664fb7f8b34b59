//! Requests that belong to another node: told where to go, or forwarded there.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tessera_node::actors::Placement;

use crate::api::{ApiError, Gateway};

/// The header marking a request one gateway forwarded to another (never forwarded again).
pub(crate) const FORWARDED: &str = "x-tessera-forwarded";

/// Another node's gateway, where a request is forwarded.
pub(crate) struct Target {
    pub(crate) node: String,
    pub(crate) endpoint: Option<String>,
}

impl Target {
    /// The answer to a request that must go to this node instead: `what` runs there.
    pub(crate) fn elsewhere(&self, what: &str, why: &str) -> ApiError {
        let at = self.endpoint.as_deref().map(|e| format!(" at {e}")).unwrap_or_default();
        ApiError::new(StatusCode::MISDIRECTED_REQUEST, "elsewhere", format!("{what} is on node {}{at}{why}", self.node))
    }
}

impl From<&Placement> for Target {
    fn from(p: &Placement) -> Self {
        Target { node: p.node.clone(), endpoint: p.endpoint.clone() }
    }
}

/// Whether a request may be forwarded (it was not forwarded already).
pub(crate) fn forwardable(headers: &HeaderMap) -> bool {
    !headers.contains_key(FORWARDED)
}

impl Gateway {
    /// Sends an (unsigned) request on to another node's gateway and relays its answer.
    pub(crate) async fn forward(
        &self,
        placement: &Target,
        method: reqwest::Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Response, ApiError> {
        let Some(endpoint) = &placement.endpoint else {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "unreachable",
                format!("the actor runs on node {}, which has no gateway", placement.node),
            ));
        };
        let url = format!("{}{path}", endpoint.trim_end_matches('/'));
        let mut req = self.http.request(method, &url).header(FORWARDED, self.node.id());
        if let Some(b) = body {
            req = req.header(header::CONTENT_TYPE, "application/json").body(b);
        }
        let unreachable = |e: reqwest::Error| {
            ApiError::new(StatusCode::BAD_GATEWAY, "unreachable", format!("node {} at {url}: {e}", placement.node))
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let bytes = resp.bytes().await.map_err(unreachable)?;
        Ok((status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response())
    }

    /// A live node by id, with its gateway.
    pub(crate) async fn node_target(&self, node: &str) -> Result<Target, ApiError> {
        let nodes = tessera_node::list_nodes(self.node.members().as_ref()).await.map_err(ApiError::backend)?;
        let r = nodes
            .into_iter()
            .find(|r| r.id == node)
            .ok_or_else(|| ApiError::not_found(format!("no live node {node:?}")))?;
        Ok(Target { node: r.id, endpoint: r.endpoint })
    }
}
