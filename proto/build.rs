fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=kiln");
    prost_build::compile_protos(&["kiln/worker.proto"], &["."])?;
    // The job API of `kiln coordinator` (server and client).
    tonic_prost_build::configure().compile_protos(&["kiln/job.proto"], &["."])?;
    // The Open Inference Protocol service of `kiln serve` (server and client:
    // tests and tools call it). Raw tensor bytes as `Bytes`: no copy on decode.
    tonic_prost_build::configure()
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_protos(&["kiln/inference.proto"], &["."])
}
