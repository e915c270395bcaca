// Embed an rpath to libtorch so `kiln` runs with no LD_LIBRARY_PATH.
// `rustc-link-arg` reaches only the crate whose build script prints it, so every
// crate that links a binary against tch carries this script (TOOLCHAIN.md).
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
