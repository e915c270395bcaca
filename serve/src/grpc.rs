//! The gRPC front end: `inference.GRPCInferenceService` (KServe v2 /
//! Triton), on the same port as REST.
//!
//! Inputs come as `raw_input_contents` (one entry per input, little-endian
//! bytes; what tritonclient sends) or as typed `contents` lists. Outputs are
//! always returned as `raw_output_contents`, one entry per output in order,
//! as Triton does and as tritonclient reads them.
//!
//! Auth: `ServerLive` and `ServerReady` are open; every other call needs the
//! inference token in the `authorization` metadata when one is set. The
//! token is checked once, by the guard in front of this service
//! (`grpc_guard.rs`), before the message is read: every gRPC request reaches
//! the service through it (`app::app`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_proto::inference::grpc_inference_service_server::GrpcInferenceService;
use kiln_proto::inference::infer_parameter::ParameterChoice;
use kiln_proto::inference::model_infer_request::InferInputTensor;
use kiln_proto::inference::model_infer_response::InferOutputTensor;
use kiln_proto::inference::model_metadata_response::TensorMetadata;
use kiln_proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use tonic::{Request, Response, Status};

use crate::error::{ErrorKind, RequestError};
use crate::protocol::{InferRequest, InputData, InputTensor, Number, RequestedOutput};
use crate::server::{EXTENSIONS, Protocol, ServerState};

/// The gRPC service over the server's state.
#[derive(Debug, Clone)]
pub struct InferenceService {
    state: Arc<ServerState>,
}

impl InferenceService {
    /// The service of `state`.
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }
}

fn version_arg(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse {
            ready: self.state.is_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let ready = match self.state.model_ready(&r.name, version_arg(&r.version)) {
            Ok(ready) => ready,
            Err(e) if e.kind == ErrorKind::NotFound => false,
            Err(e) => return Err(e.into()),
        };
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "kiln".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let m = self
            .state
            .model_metadata(&r.name, version_arg(&r.version))?;
        let tensors = |list: Vec<crate::server::TensorMetadata>| {
            list.into_iter()
                .map(|t| TensorMetadata {
                    name: t.name,
                    datatype: t.datatype,
                    shape: t.shape,
                })
                .collect()
        };
        Ok(Response::new(ModelMetadataResponse {
            name: m.name,
            versions: m.versions,
            platform: m.platform,
            inputs: tensors(m.inputs),
            outputs: tensors(m.outputs),
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let received = Instant::now();
        let deadline = grpc_timeout(&request);
        // The token was checked by the guard in front of the service
        // (grpc_guard.rs), before the message was read.
        let r = request.into_inner();
        let prepared = to_request(&r, deadline);
        let (model, version) = (r.model_name.clone(), r.model_version.clone());
        let req = match prepared {
            Ok(req) => req,
            Err(e) => {
                let labels = self.state.request_labels(&model, true, Protocol::Grpc);
                self.state.record_error(&labels, &e, received);
                return Err(e.into());
            }
        };
        let response = self
            .state
            .infer(&model, version_arg(&version), req, Protocol::Grpc, received)
            .await?;
        let mut outputs = Vec::with_capacity(response.outputs.len());
        let mut raw = Vec::with_capacity(response.outputs.len());
        for o in response.outputs {
            raw.push(Bytes::from(o.data.to_le_bytes()));
            outputs.push(InferOutputTensor {
                name: o.name,
                datatype: o.datatype.to_string(),
                shape: o.shape,
                parameters: Default::default(),
                contents: None,
            });
        }
        let mut labels = self.state.request_labels(&model, true, Protocol::Grpc);
        labels.version = response.model_version.clone();
        let reply = Response::new(ModelInferResponse {
            model_name: response.model_name,
            model_version: response.model_version,
            id: response.id.unwrap_or_default(),
            parameters: Default::default(),
            outputs,
            raw_output_contents: raw,
        });
        let overhead = received.elapsed().saturating_sub(response.compute);
        self.state.metrics.observe_overhead(&labels, overhead);
        Ok(reply)
    }
}

/// The client's deadline from the `grpc-timeout` header (`<digits><unit>`).
fn grpc_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let v = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn bad(message: String) -> RequestError {
    RequestError::bad_request(message)
}

/// A gRPC request in protocol-neutral form.
fn to_request(
    r: &ModelInferRequest,
    deadline: Option<Duration>,
) -> Result<InferRequest, RequestError> {
    let raw = &r.raw_input_contents;
    if !raw.is_empty() && raw.len() != r.inputs.len() {
        return Err(bad(format!(
            "raw_input_contents has {} entries for {} inputs; give one per input or none",
            raw.len(),
            r.inputs.len()
        )));
    }
    let mut inputs = Vec::with_capacity(r.inputs.len());
    for (i, input) in r.inputs.iter().enumerate() {
        let data = if raw.is_empty() {
            contents(input)?
        } else {
            if input.contents.is_some() {
                return Err(bad(format!(
                    "input {}: has both contents and raw_input_contents; send one",
                    input.name
                )));
            }
            InputData::Raw(raw[i].clone())
        };
        inputs.push(InputTensor {
            name: input.name.clone(),
            datatype: input.datatype.clone(),
            shape: input.shape.clone(),
            data,
        });
    }
    let timeout = match r.parameters.get("timeout") {
        None => None,
        Some(p) => match &p.parameter_choice {
            Some(ParameterChoice::Int64Param(us)) if *us >= 0 => {
                Some(Duration::from_micros(*us as u64))
            }
            Some(ParameterChoice::Uint64Param(us)) => Some(Duration::from_micros(*us)),
            _ => {
                return Err(bad(
                    "parameters.timeout must be a whole number of microseconds".to_string(),
                ));
            }
        },
    };
    let timeout = match (timeout, deadline) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let outputs = (!r.outputs.is_empty()).then(|| {
        r.outputs
            .iter()
            .map(|o| RequestedOutput {
                name: o.name.clone(),
                binary: None,
            })
            .collect()
    });
    Ok(InferRequest {
        id: (!r.id.is_empty()).then(|| r.id.clone()),
        inputs,
        outputs,
        binary_output: false,
        timeout,
    })
}

/// Typed `contents` of an input, by its datatype.
fn contents(input: &InferInputTensor) -> Result<InputData, RequestError> {
    let Some(c) = &input.contents else {
        return Err(bad(format!(
            "input {}: no data (set contents or raw_input_contents)",
            input.name
        )));
    };
    let floats = |v: &[f64]| InputData::Numbers(v.iter().map(|&x| Number::Float(x)).collect());
    Ok(match input.datatype.as_str() {
        "FP32" => InputData::Numbers(
            c.fp32_contents
                .iter()
                .map(|&x| Number::Float(f64::from(x)))
                .collect(),
        ),
        "FP64" => floats(&c.fp64_contents),
        "INT8" | "INT16" | "INT32" => InputData::Numbers(
            c.int_contents
                .iter()
                .map(|&x| Number::Int(i64::from(x)))
                .collect(),
        ),
        "INT64" => InputData::Numbers(c.int64_contents.iter().map(|&x| Number::Int(x)).collect()),
        "UINT8" | "UINT16" | "UINT32" => InputData::Numbers(
            c.uint_contents
                .iter()
                .map(|&x| Number::Uint(u64::from(x)))
                .collect(),
        ),
        "UINT64" => {
            InputData::Numbers(c.uint64_contents.iter().map(|&x| Number::Uint(x)).collect())
        }
        "BOOL" => InputData::Bools(c.bool_contents.clone()),
        other => {
            return Err(bad(format!(
                "input {}: datatype {other} has no typed contents list; send raw_input_contents",
                input.name
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::inference::{InferParameter, InferTensorContents};

    fn input(datatype: &str, contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor {
            name: "input".into(),
            datatype: datatype.into(),
            shape: vec![1, 2],
            parameters: Default::default(),
            contents,
        }
    }

    #[test]
    fn raw_and_typed_contents() {
        let mut r = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![input("FP32", None)],
            raw_input_contents: vec![Bytes::from_static(&[0; 8])],
            ..Default::default()
        };
        r.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(2000)),
            },
        );
        let q = to_request(&r, Some(Duration::from_millis(1))).unwrap();
        assert_eq!(q.timeout, Some(Duration::from_millis(1)));
        assert!(matches!(q.inputs[0].data, InputData::Raw(ref b) if b.len() == 8));

        r.raw_input_contents.clear();
        r.inputs[0].contents = Some(InferTensorContents {
            fp32_contents: vec![1.0, 2.0],
            ..Default::default()
        });
        let q = to_request(&r, None).unwrap();
        assert_eq!(q.timeout, Some(Duration::from_micros(2000)));
        assert_eq!(
            q.inputs[0].data,
            InputData::Numbers(vec![Number::Float(1.0), Number::Float(2.0)])
        );

        r.raw_input_contents = vec![Bytes::new(), Bytes::new()];
        assert!(
            to_request(&r, None)
                .unwrap_err()
                .message
                .contains("2 entries for 1 inputs")
        );
        r.raw_input_contents.clear();
        r.inputs[0] = input("FP16", Some(InferTensorContents::default()));
        assert!(
            to_request(&r, None)
                .unwrap_err()
                .message
                .contains("no typed contents")
        );
        r.inputs[0] = input("FP32", None);
        assert!(
            to_request(&r, None)
                .unwrap_err()
                .message
                .contains("no data")
        );
    }
}
