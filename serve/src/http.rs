//! The REST front end: the Open Inference Protocol v2 over HTTP/1.1 and
//! HTTP/2, with Triton's binary tensor data extension, the model repository
//! extension (management) and `/metrics`.
//!
//! Binary tensor data: a request body may be a JSON header followed by raw
//! tensor bytes; the `Inference-Header-Content-Length` header gives the
//! JSON's length, and each binary input says how many bytes it takes with its
//! `binary_data_size` parameter, in input order. Outputs are sent as binary
//! data when the output's `binary_data` parameter, or else the request's
//! `binary_data_output` parameter, is true; the response then carries
//! `Inference-Header-Content-Length` too, and each binary output its
//! `binary_data_size`.
//!
//! Language models also answer Triton's generate extension
//! (`.../generate`, `.../generate_stream`; see [`crate::generate`]).
//!
//! Every error is the protocol's `{"error": "..."}` with a 4xx or 5xx status.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use crate::auth;
use crate::error::{ErrorKind, RequestError};
use crate::generate;
use crate::protocol::{InferRequest, InferResponse, InputData, InputTensor, RequestedOutput};
use crate::server::{EXTENSIONS, Protocol, ServerState};

/// The header that gives the JSON part's length in a binary request or response.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

type Shared = State<Arc<ServerState>>;

/// Every REST route.
pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(version_metadata),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(version_ready),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/v2/models/{name}/generate", post(generate::generate))
        .route(
            "/v2/models/{name}/versions/{version}/generate",
            post(generate::generate_version),
        )
        .route(
            "/v2/models/{name}/generate_stream",
            post(generate::generate_stream),
        )
        .route(
            "/v2/models/{name}/versions/{version}/generate_stream",
            post(generate::generate_stream_version),
        )
        .route("/v2/repository/index", post(index).get(index))
        .route("/v2/repository/models/{name}/load", post(load))
        .route("/v2/repository/models/{name}/unload", post(unload))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found() -> RequestError {
    RequestError::not_found(
        "no such endpoint; see /v2, /v2/models/{name}, /v2/models/{name}/infer, /v2/models/{name}/generate, /v2/health/live, /metrics",
    )
}

async fn method_not_allowed() -> Response {
    let e = serde_json::json!({"error": "method not allowed on this endpoint"}).to_string();
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::CONTENT_TYPE, "application/json")],
        e,
    )
        .into_response()
}

pub(crate) fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

pub(crate) fn json_response(value: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(state): Shared) -> Response {
    if state.is_ready() {
        StatusCode::OK.into_response()
    } else {
        // The protocol answers "not ready" with a 4xx.
        RequestError::bad_request("the server is not ready (models are loading)").into_response()
    }
}

async fn server_metadata(State(state): Shared, headers: HeaderMap) -> Response {
    if let Err(e) = auth::check_inference(&state.tokens, authorization(&headers)) {
        return e.into_response();
    }
    json_response(json!({
        "name": "kiln",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
    }))
}

async fn model_metadata(state: Shared, Path(name): Path<String>, headers: HeaderMap) -> Response {
    metadata(state, name, None, headers)
}

async fn version_metadata(
    state: Shared,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    metadata(state, name, Some(version), headers)
}

fn metadata(
    State(state): Shared,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
) -> Response {
    let result = auth::check_inference(&state.tokens, authorization(&headers))
        .and_then(|()| state.model_metadata(&name, version.as_deref()));
    match result {
        Ok(m) => json_response(serde_json::to_value(m).unwrap_or(Value::Null)),
        Err(e) => e.into_response(),
    }
}

async fn model_ready(state: Shared, Path(name): Path<String>, headers: HeaderMap) -> Response {
    readiness(state, name, None, headers)
}

async fn version_ready(
    state: Shared,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    readiness(state, name, Some(version), headers)
}

fn readiness(
    State(state): Shared,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
) -> Response {
    let result = auth::check_inference(&state.tokens, authorization(&headers))
        .and_then(|()| state.model_ready(&name, version.as_deref()));
    match result {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => RequestError::bad_request(format!(
            "model {name} version {} is not ready",
            version.unwrap_or_default()
        ))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn metrics(State(state): Shared) -> Response {
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

async fn infer(
    state: Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_common(state, name, None, headers, body).await
}

async fn infer_version(
    state: Shared,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_common(state, name, Some(version), headers, body).await
}

async fn infer_common(
    State(state): Shared,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received = Instant::now();
    let limit = state.config.request_timeout();
    let prepared = tokio::time::timeout(limit, async {
        auth::check_inference(&state.tokens, authorization(&headers))?;
        read_request(&headers, body, state.config.limits.max_request_bytes).await
    })
    .await
    .unwrap_or_else(|_| {
        Err(RequestError::new(
            ErrorKind::Timeout,
            format!(
                "the request body did not arrive within {} ms",
                limit.as_millis()
            ),
        ))
    });
    let request = match prepared {
        Ok(r) => r,
        Err(e) => {
            let authenticated = e.kind != ErrorKind::Unauthorized;
            let labels = state.request_labels(&name, authenticated, Protocol::Http);
            state.record_error(&labels, &e, received);
            return e.into_response();
        }
    };
    match state
        .infer(&name, version.as_deref(), request, Protocol::Http, received)
        .await
    {
        Ok(response) => {
            let mut labels = state.request_labels(&name, true, Protocol::Http);
            labels.version = response.model_version.clone();
            let compute = response.compute;
            let encoded = encode_response(response);
            let overhead = received.elapsed().saturating_sub(compute);
            state.metrics.observe_overhead(&labels, overhead);
            encoded
        }
        Err(e) => e.into_response(),
    }
}

/// The JSON part of an inference request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    inputs: Vec<JsonInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<JsonOutput>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    /// Kept as text: [`parse_json_data`] converts it without a JSON tree.
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

fn bad(message: String) -> RequestError {
    RequestError::bad_request(message)
}

/// Reads the body (at most `max_bytes`) and parses it into a request.
async fn read_request(
    headers: &HeaderMap,
    body: Body,
    max_bytes: usize,
) -> Result<InferRequest, RequestError> {
    let body = read_body(headers, body, max_bytes).await?;
    let json_len = match headers.get(HEADER_LENGTH) {
        None => body.len(),
        Some(v) => {
            let n = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    bad(format!(
                        "header Inference-Header-Content-Length: {v:?} is not a byte count"
                    ))
                })?;
            if n > body.len() {
                return Err(bad(format!(
                    "header Inference-Header-Content-Length is {n} but the body has {} bytes",
                    body.len()
                )));
            }
            n
        }
    };
    parse_request_bytes(body.slice(..json_len), body.slice(json_len..))
}

/// Reads a body of at most `max_bytes`, uncompressed.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max_bytes: usize,
) -> Result<Bytes, RequestError> {
    if let Some(enc) = headers.get(header::CONTENT_ENCODING) {
        let enc = enc.to_str().unwrap_or("?").trim().to_ascii_lowercase();
        if enc != "identity" {
            return Err(RequestError::new(
                ErrorKind::UnsupportedMediaType,
                format!("content encoding {enc:?} is not supported; send the body uncompressed"),
            ));
        }
    }
    let too_large = |n: String| {
        RequestError::new(
            ErrorKind::TooLarge,
            format!(
                "the request body ({n} bytes) is larger than this server's limit of {max_bytes} bytes"
            ),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max_bytes as u64
    {
        return Err(too_large(len.to_string()));
    }
    let mut buf = BytesMut::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| bad(format!("read the request body: {e}")))?;
        if buf.len() + chunk.len() > max_bytes {
            return Err(too_large("more than that".to_string()));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Parses a request: its JSON part and the binary data after it (empty
/// without the binary data extension).
pub fn parse_request(json: &[u8], binary: Bytes) -> Result<InferRequest, RequestError> {
    parse_request_bytes(Bytes::copy_from_slice(json), binary)
}

/// [`parse_request`] on the body's own bytes: each JSON tensor's `data`
/// text is kept as a slice of them, not copied.
fn parse_request_bytes(json: Bytes, mut binary: Bytes) -> Result<InferRequest, RequestError> {
    // Tracking the path costs more per element than parsing a number does,
    // so it is only done to explain a request that failed without it.
    let req: JsonRequest = match serde_json::from_slice(&json) {
        Ok(req) => req,
        Err(plain) => {
            let mut de = serde_json::Deserializer::from_slice(&json);
            let tracked: Result<JsonRequest, _> = serde_path_to_error::deserialize(&mut de);
            return Err(match tracked.map(|_| de.end()) {
                Err(e) => {
                    let path = e.path().to_string();
                    let inner = e.into_inner();
                    if path.is_empty() || path == "." {
                        bad(format!("invalid request JSON: {inner}"))
                    } else {
                        bad(format!("invalid request JSON at {path}: {inner}"))
                    }
                }
                Ok(_) => bad(format!("invalid request JSON: {plain}")),
            });
        }
    };
    let params = req.parameters.unwrap_or_default();
    let binary_output = bool_param(&params, "binary_data_output", "parameters")?.unwrap_or(false);
    let timeout = match params.get("timeout") {
        None => None,
        Some(v) => Some(Duration::from_micros(v.as_u64().ok_or_else(|| {
            bad(format!(
                "parameters.timeout: {v} is not a whole number of microseconds"
            ))
        })?)),
    };

    let mut inputs = Vec::with_capacity(req.inputs.len());
    for (i, input) in req.inputs.into_iter().enumerate() {
        let params = input.parameters.unwrap_or_default();
        let size = match params.get("binary_data_size") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                bad(format!(
                    "inputs[{i}].parameters.binary_data_size: {v} is not a byte count"
                ))
            })? as usize),
        };
        let data = match (size, input.data) {
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "input {}: has both data and binary_data_size; send one",
                    input.name
                )));
            }
            (Some(n), None) => {
                if n > binary.len() {
                    return Err(bad(format!(
                        "input {}: binary_data_size is {n} but only {} binary bytes are left in the body",
                        input.name,
                        binary.len()
                    )));
                }
                InputData::Raw(binary.split_to(n))
            }
            (None, Some(d)) => InputData::Json(json.slice_ref(d.get().as_bytes())),
            (None, None) => {
                return Err(bad(format!(
                    "input {}: no data (give data, or binary_data_size with the binary data extension)",
                    input.name
                )));
            }
        };
        inputs.push(InputTensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data after the inputs' binary_data_size total",
            binary.len()
        )));
    }
    let outputs = match req.outputs {
        None => None,
        Some(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (i, o) in list.into_iter().enumerate() {
                let params = o.parameters.unwrap_or_default();
                if params.contains_key("classification") {
                    return Err(bad(format!(
                        "outputs[{i}].parameters.classification is not supported; request predictions or probabilities"
                    )));
                }
                let binary =
                    bool_param(&params, "binary_data", &format!("outputs[{i}].parameters"))?;
                out.push(RequestedOutput {
                    name: o.name,
                    binary,
                });
            }
            Some(out)
        }
    };
    Ok(InferRequest {
        id: req.id,
        inputs,
        outputs,
        binary_output,
        timeout,
    })
}

fn bool_param(
    params: &Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<Option<bool>, RequestError> {
    match params.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(bad(format!("{at}.{key}: {other} is not true or false"))),
    }
}

/// The response: JSON alone, or JSON then binary outputs.
fn encode_response(response: InferResponse) -> Response {
    let mut binary: Vec<u8> = Vec::new();
    let mut outputs = Vec::with_capacity(response.outputs.len());
    for o in &response.outputs {
        let mut obj = json!({
            "name": o.name,
            "datatype": o.datatype.as_str(),
            "shape": o.shape,
        });
        if o.binary {
            let bytes = o.data.to_le_bytes();
            obj["parameters"] = json!({ "binary_data_size": bytes.len() });
            binary.extend_from_slice(&bytes);
        } else {
            if !o.data.json_safe() {
                return RequestError::internal(format!(
                    "output {} holds NaN or infinite values, which JSON cannot carry; request it as binary data",
                    o.name
                ))
                .into_response();
            }
            obj["data"] = o.data.to_json();
        }
        outputs.push(obj);
    }
    let mut head = json!({
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    });
    if let Some(id) = &response.id {
        head["id"] = Value::String(id.clone());
    }
    let head = head.to_string();
    if binary.is_empty() {
        return json_response_text(head);
    }
    let json_len = head.len();
    let mut body = head.into_bytes();
    body.extend_from_slice(&binary);
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(HEADER_LENGTH, HeaderValue::from(json_len));
    response
}

fn json_response_text(text: String) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        text,
    )
        .into_response()
}

// ----- management (model repository extension) -----

/// Checks a management request: its token or origin (see [`auth`]: without
/// a token, also the host it names), and for POSTs a JSON content type,
/// which a cross-site form cannot send.
fn admin(
    state: &ServerState,
    headers: &HeaderMap,
    uri: &Uri,
    peer: SocketAddr,
    method: &Method,
) -> Result<(), RequestError> {
    let forwarded = ["forwarded", "x-forwarded-for", "x-real-ip"]
        .iter()
        .any(|h| headers.contains_key(*h));
    let host = headers
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or_default())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    let origin = auth::Origin {
        peer,
        listener_loopback: state.config.listen.ip().is_loopback(),
        forwarded,
        host,
    };
    auth::check_admin(&state.tokens, authorization(headers), origin)?;
    if method == Method::POST && !is_json(headers) {
        return Err(RequestError::new(
            ErrorKind::UnsupportedMediaType,
            "management requests must be sent with Content-Type: application/json",
        ));
    }
    Ok(())
}

/// Whether the request's content type is JSON (`application/json`, any parameters).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

async fn index(
    State(state): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = admin(&state, &headers, &uri, peer, &method) {
        return e.into_response();
    }
    let mut list = Vec::new();
    for (name, d) in state.all_deployments() {
        for (version, weight) in d.routing().weights() {
            list.push(json!({
                "name": name,
                "version": version.to_string(),
                "state": "READY",
                "selector": d.selector.to_string(),
                "weight": weight,
            }));
        }
    }
    json_response(Value::Array(list))
}

/// Body of a load request: `{"parameters": {"alias": "production"}}` or
/// `{"parameters": {"version": 3}}`; none: the model's current selector, or
/// its latest version.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadRequest {
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

async fn load(
    State(state): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(e) = admin(&state, &headers, &uri, peer, &Method::POST) {
        return e.into_response();
    }
    match load_inner(&state, &name, body).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn load_inner(state: &Arc<ServerState>, name: &str, body: Body) -> Result<(), RequestError> {
    let bytes = axum::body::to_bytes(body, 64 << 10).await.map_err(|e| {
        RequestError::new(
            ErrorKind::TooLarge,
            format!("read the load request (at most 64 KiB): {e}"),
        )
    })?;
    let req: LoadRequest = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        LoadRequest::default()
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("invalid load request JSON: {e}")))?
    };
    let params = req.parameters.unwrap_or_default();
    let text = match (params.get("alias"), params.get("version")) {
        (Some(_), Some(_)) => {
            return Err(bad("parameters: give alias or version, not both".into()));
        }
        (Some(Value::String(a)), None) => format!("{name}@{a}"),
        (Some(other), None) => {
            return Err(bad(format!("parameters.alias: {other} is not a string")));
        }
        (None, Some(v)) => {
            let n = v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| bad(format!("parameters.version: {v} is not a version number")))?;
            format!("{name}:{n}")
        }
        (None, None) => match state.deployment(name) {
            Ok(d) => d.selector.to_string(),
            Err(_) => name.to_string(),
        },
    };
    let selector = text
        .parse()
        .map_err(|e: kiln_checkpoint::Error| bad(e.to_string()))?;
    state.load_model(selector).await.map_err(|e| {
        let kind = if e.is_not_found() {
            ErrorKind::NotFound
        } else {
            ErrorKind::Internal
        };
        RequestError::new(kind, format!("load {text}: {e}"))
    })
}

async fn unload(
    State(state): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = admin(&state, &headers, &uri, peer, &Method::POST) {
        return e.into_response();
    }
    if state.unload_model(&name) {
        StatusCode::OK.into_response()
    } else {
        RequestError::not_found(format!("model {name:?} is not served by this server"))
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_request_splits_inputs_in_order() {
        let json = br#"{"inputs":[{"name":"input","shape":[1,2],"datatype":"FP32","parameters":{"binary_data_size":8}}],"parameters":{"binary_data_output":true,"timeout":1500}}"#;
        let bin: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let r = parse_request(json, Bytes::from(bin.clone())).unwrap();
        assert!(r.binary_output);
        assert_eq!(r.timeout, Some(Duration::from_micros(1500)));
        assert_eq!(r.inputs[0].data, InputData::Raw(Bytes::from(bin.clone())));

        let mut extra = bin.clone();
        extra.push(0);
        let e = parse_request(json, Bytes::from(extra)).unwrap_err();
        assert!(e.message.contains("1 bytes of binary data after"), "{e}");
        let e = parse_request(json, Bytes::from(bin[..4].to_vec())).unwrap_err();
        assert!(e.message.contains("only 4 binary bytes"), "{e}");
    }

    #[test]
    fn json_errors_name_the_place() {
        let e = parse_request(
            br#"{"inputs":[{"name":"x","shape":"1","datatype":"FP32","data":[1]}]}"#,
            Bytes::new(),
        )
        .unwrap_err();
        assert!(e.message.contains("inputs[0].shape"), "{e}");
        let e = parse_request(br#"{"inputz":[]}"#, Bytes::new()).unwrap_err();
        assert!(e.message.contains("inputz"), "{e}");
        let e = parse_request(
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#,
            Bytes::new(),
        )
        .unwrap_err();
        assert!(e.message.contains("no data"), "{e}");
        let e = parse_request(
            br#"{"inputs":[], "outputs":[{"name":"logits","parameters":{"binary_data":1}}]}"#,
            Bytes::new(),
        )
        .unwrap_err();
        assert!(
            e.message.contains("outputs[0].parameters.binary_data"),
            "{e}"
        );
        let e = parse_request(br#"{"inputs":[]} trailing"#, Bytes::new()).unwrap_err();
        assert!(e.message.contains("invalid request JSON"), "{e}");
    }
}
