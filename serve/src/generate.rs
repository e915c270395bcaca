//! Triton's generate extension for language models: the request
//! (`{"text_input": "...", "parameters": {...}}`), its parameters checked
//! against the model, and the response and server-sent events.
//!
//! `POST /v2/models/{name}[/versions/{v}]/generate` answers one JSON object
//! `{"model_name", "model_version", "text_output"}`; `.../generate_stream`
//! answers `text/event-stream`, one `data: {...}` event per generated token
//! whose `text_output` is that token's text. Errors before generation starts
//! are the protocol's `{"error": "..."}` with a 4xx/5xx status; an error
//! during a stream is a last event `data: {"error": "..."}` (the status,
//! 200, was already sent), as Triton does.
//!
//! `text_output` is the generated continuation, without the prompt.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{ErrorKind, RequestError};
use crate::lm::{GenerateEvent, GenerateParams};
use crate::server::{Generation, Protocol, ServerState};
use crate::{auth, http};

type Shared = State<Arc<ServerState>>;

/// Tokens generated when the request does not say, at most the context.
pub const DEFAULT_MAX_TOKENS: usize = 64;
/// Sampling temperature when the request does not say.
pub const DEFAULT_TEMPERATURE: f64 = 1.0;

/// A generate request as received: the prompt and the parameters the client
/// gave (`None`: the default).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt, tokenized with the version's tokenizer.
    pub text_input: String,
    /// Tokens to generate, as given (checked later: 1 to the context).
    pub max_tokens: Option<i64>,
    /// Sampling temperature, as given (checked later: finite, >= 0).
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens, as given (checked later: >= 1).
    pub top_k: Option<i64>,
    /// The sampler's seed; `None`: a draw from the server's generator.
    pub seed: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonGenerate {
    text_input: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

fn bad(message: String) -> RequestError {
    RequestError::bad_request(message)
}

/// The parameters a generate request may carry.
const PARAMETERS: &str = "max_tokens, temperature, top_k, seed (and stream, ignored)";

/// Parses a generate request body.
pub fn parse_request(body: &[u8]) -> Result<GenerateRequest, RequestError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let req: JsonGenerate = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            bad(format!("invalid generate request JSON: {inner}"))
        } else {
            bad(format!("invalid generate request JSON at {path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| bad(format!("invalid generate request JSON: {e}")))?;
    let mut out = GenerateRequest {
        text_input: req.text_input,
        max_tokens: None,
        temperature: None,
        top_k: None,
        seed: None,
    };
    for (key, value) in req.parameters.unwrap_or_default() {
        let at = format!("parameters.{key}");
        match key.as_str() {
            "max_tokens" => out.max_tokens = Some(integer(&at, &value)?),
            "top_k" => out.top_k = Some(integer(&at, &value)?),
            "seed" => {
                out.seed =
                    Some(value.as_u64().ok_or_else(|| {
                        bad(format!("{at}: {value} is not a whole number from 0"))
                    })?)
            }
            "temperature" => {
                out.temperature = Some(
                    value
                        .as_f64()
                        .ok_or_else(|| bad(format!("{at}: {value} is not a number")))?,
                )
            }
            // Clients of Triton's extension send it; the endpoint decides.
            "stream" if value.is_boolean() => {}
            _ => {
                return Err(bad(format!(
                    "{at} is not a parameter kiln's language models take; they take {PARAMETERS}"
                )));
            }
        }
    }
    Ok(out)
}

fn integer(at: &str, value: &Value) -> Result<i64, RequestError> {
    value
        .as_i64()
        .or_else(|| {
            value
                .as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        })
        .ok_or_else(|| bad(format!("{at}: {value} is not a whole number")))
}

impl GenerateRequest {
    /// The sampling parameters for a model of `context` tokens and `vocab`
    /// ids; `seed` is used when the request gives none. `max_tokens` is 1 to
    /// the context (generation stops when the context fills, so more could
    /// never come back), `temperature` finite and at least 0, `top_k` at
    /// least 1.
    pub fn params(
        &self,
        context: usize,
        vocab: usize,
        seed: u64,
    ) -> Result<GenerateParams, RequestError> {
        let max_tokens = match self.max_tokens {
            None => DEFAULT_MAX_TOKENS.min(context),
            Some(n) if n >= 1 && n as u64 <= context as u64 => n as usize,
            Some(n) => {
                return Err(bad(format!(
                    "parameters.max_tokens is {n}; it must be 1 to {context} (the model's context)"
                )));
            }
        };
        let temperature = self.temperature.unwrap_or(DEFAULT_TEMPERATURE);
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(bad(format!(
                "parameters.temperature is {temperature}; it must be a number >= 0 (0: always the most likely token)"
            )));
        }
        let top_k = match self.top_k {
            None => None,
            Some(k) if k >= 1 => Some((k as u64).min(vocab as u64) as usize),
            Some(k) => {
                return Err(bad(format!(
                    "parameters.top_k is {k}; it must be at least 1 (leave it out to sample from every token)"
                )));
            }
        };
        Ok(GenerateParams {
            max_tokens,
            temperature,
            top_k,
            seed: self.seed.unwrap_or(seed),
        })
    }
}

/// The response of `/generate`, and the payload of each streamed event.
pub fn response_json(model_name: &str, model_version: &str, text_output: &str) -> Value {
    json!({
        "model_name": model_name,
        "model_version": model_version,
        "text_output": text_output,
    })
}

/// One server-sent event carrying `value`.
pub fn sse_event(value: &Value) -> String {
    // serde_json escapes line breaks inside strings, so the JSON is one line.
    format!("data: {value}\n\n")
}

// ----- the HTTP endpoints -----

/// `POST /v2/models/{name}/generate`.
pub async fn generate(
    state: Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate_common(state, name, None, headers, body, false).await
}

/// `POST /v2/models/{name}/versions/{version}/generate`.
pub async fn generate_version(
    state: Shared,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate_common(state, name, Some(version), headers, body, false).await
}

/// `POST /v2/models/{name}/generate_stream`.
pub async fn generate_stream(
    state: Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate_common(state, name, None, headers, body, true).await
}

/// `POST /v2/models/{name}/versions/{version}/generate_stream`.
pub async fn generate_stream_version(
    state: Shared,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate_common(state, name, Some(version), headers, body, true).await
}

/// Checks the token, reads and parses the body, starts the generation, and
/// answers whole or streamed; every outcome is counted in the metrics.
async fn generate_common(
    State(state): Shared,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
    stream: bool,
) -> Response {
    let received = Instant::now();
    let limit = state.config.request_timeout();
    let prepared = tokio::time::timeout(limit, async {
        auth::check_inference(&state.tokens, http::authorization(&headers))?;
        let body = http::read_body(&headers, body, state.config.limits.max_request_bytes).await?;
        parse_request(&body)
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
    let generation = match state
        .generate(&name, version.as_deref(), request, received)
        .await
    {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    if stream {
        stream_response(state, generation, received)
    } else {
        whole_response(&state, generation, received).await
    }
}

/// `/generate`: waits for the whole text.
async fn whole_response(
    state: &ServerState,
    mut generation: Generation,
    received: Instant,
) -> Response {
    let deadline = generation.deadline;
    let outcome = tokio::time::timeout_at(deadline.into(), async {
        loop {
            match generation.events.recv().await {
                Some(GenerateEvent::Piece(_)) => {}
                Some(GenerateEvent::Done { text, .. }) => return Ok(text),
                Some(GenerateEvent::Failed(e)) => return Err(e),
                None => return Err(RequestError::internal("the compute thread stopped")),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        Err(RequestError::new(
            ErrorKind::Timeout,
            "the generation did not finish within the request's time limit",
        ))
    });
    match outcome {
        Ok(text) => {
            state.record_success(&generation.labels, received);
            http::json_response(response_json(
                &generation.model_name,
                &generation.model_version,
                &text,
            ))
        }
        Err(e) => {
            state.record_error(&generation.labels, &e, received);
            e.into_response()
        }
    }
}

/// `/generate_stream`: one server-sent event per generated token; an error
/// after the start is a last event `{"error": "..."}`.
fn stream_response(state: Arc<ServerState>, generation: Generation, received: Instant) -> Response {
    let events = futures::stream::unfold(Some((state, generation)), move |open| async move {
        let (state, mut g) = open?;
        let event = match g.events.recv().await {
            Some(GenerateEvent::Piece(piece)) => {
                let v = response_json(&g.model_name, &g.model_version, &piece);
                let chunk = Bytes::from(sse_event(&v));
                return Some((
                    Ok::<Bytes, std::convert::Infallible>(chunk),
                    Some((state, g)),
                ));
            }
            Some(GenerateEvent::Done { .. }) => {
                state.record_success(&g.labels, received);
                return None;
            }
            Some(GenerateEvent::Failed(e)) => e,
            None => RequestError::internal("the compute thread stopped"),
        };
        state.record_error(&g.labels, &event, received);
        let chunk = sse_event(&json!({ "error": event.message }));
        Some((Ok(Bytes::from(chunk)), None))
    });
    let mut response = Response::new(Body::from_stream(events));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tritons_request_and_checks_parameters_against_the_model() {
        let r = parse_request(
            br#"{"text_input": "Once", "parameters": {"max_tokens": 5, "temperature": 0.5, "top_k": 3, "seed": 7, "stream": false}}"#,
        )
        .unwrap();
        assert_eq!(r.text_input, "Once");
        let p = r.params(32, 256, 99).unwrap();
        assert_eq!(
            p,
            GenerateParams {
                max_tokens: 5,
                temperature: 0.5,
                top_k: Some(3),
                seed: 7
            }
        );
        let r = parse_request(br#"{"text_input": "x"}"#).unwrap();
        let p = r.params(32, 256, 99).unwrap();
        assert_eq!(
            (p.max_tokens, p.temperature, p.top_k, p.seed),
            (32, 1.0, None, 99)
        );
        // A top_k beyond the vocabulary samples from all of it.
        let r = parse_request(br#"{"text_input": "x", "parameters": {"top_k": 1000}}"#).unwrap();
        assert_eq!(r.params(32, 256, 0).unwrap().top_k, Some(256));

        let refused = |body: &str, context: usize, says: &str| {
            let e = parse_request(body.as_bytes())
                .and_then(|r| r.params(context, 256, 0))
                .unwrap_err();
            assert_eq!(e.kind, crate::error::ErrorKind::BadRequest);
            assert!(e.message.contains(says), "{e} lacks {says}");
        };
        refused(r#"{"parameters": {}}"#, 32, "text_input");
        refused(r#"{"text_input": 3}"#, 32, "text_input");
        refused(r#"{"text_input": "x", "prompt": "y"}"#, 32, "prompt");
        refused(
            r#"{"text_input": "x", "parameters": {"max_tokens": 0}}"#,
            32,
            "1 to 32",
        );
        refused(
            r#"{"text_input": "x", "parameters": {"max_tokens": 33}}"#,
            32,
            "1 to 32",
        );
        refused(
            r#"{"text_input": "x", "parameters": {"max_tokens": 2.5}}"#,
            32,
            "not a whole number",
        );
        refused(
            r#"{"text_input": "x", "parameters": {"temperature": -0.1}}"#,
            32,
            ">= 0",
        );
        refused(
            r#"{"text_input": "x", "parameters": {"top_k": 0}}"#,
            32,
            "at least 1",
        );
        refused(
            r#"{"text_input": "x", "parameters": {"seed": -1}}"#,
            32,
            "from 0",
        );
        refused(
            r#"{"text_input": "x", "parameters": {"top_p": 0.9}}"#,
            32,
            "parameters.top_p is not a parameter",
        );
        refused(r#"{"text_input": "x"} {}"#, 32, "invalid generate request");
    }

    #[test]
    fn events_are_one_line_of_json() {
        let v = response_json("m", "1", "a\nb");
        assert_eq!(
            sse_event(&v),
            "data: {\"model_name\":\"m\",\"model_version\":\"1\",\"text_output\":\"a\\nb\"}\n\n"
        );
    }
}
