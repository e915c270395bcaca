fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=kiln");
    prost_build::compile_protos(&["kiln/worker.proto"], &["."])
}
