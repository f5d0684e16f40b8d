// Keep libtorch_cuda linked: the binary references no symbol of it, so with the default
// `--as-needed` the linker drops it and `tch::Cuda::is_available()` is false on a GPU machine.
fn main() {
    let flag = "-Wl,--no-as-needed,-ltorch_cuda,--as-needed";
    println!("cargo:rustc-link-arg-bins={flag}");
    println!("cargo:rustc-link-arg-tests={flag}");
    println!("cargo:rerun-if-changed=build.rs");
}
