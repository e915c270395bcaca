// Embed an rpath to libtorch so `kiln` runs with no LD_LIBRARY_PATH.
// `rustc-link-arg` reaches only the crate whose build script prints it, so every
// crate that links a binary against tch carries this script (TOOLCHAIN.md).
//
// Also compiles csrc/mkl_linear.cpp (MKL's packed sgemm through PyTorch's
// `mkl::` operators, which tch does not expose) against the headers of the
// same libtorch.
fn main() {
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not report its libtorch folder (DEP_TCH_LIBTORCH_LIB)");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let include = std::path::Path::new(&lib)
        .parent()
        .expect("libtorch's lib folder has a parent")
        .join("include");
    println!("cargo:rerun-if-changed=csrc/mkl_linear.cpp");
    cc::Build::new()
        .cpp(true)
        .file("csrc/mkl_linear.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        // pip's torch 2.x is built with the C++11 ABI.
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("kiln_mkl_linear");
}
