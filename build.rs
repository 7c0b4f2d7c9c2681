//! With the `cuda` feature, compiles `src/kernels/decode.cu` and `flash_attention.cu` to PTX
//! with the nvcc that candle's own kernels use (CUDA_COMPUTE_CAP as candle-kernels reads it; default 90).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=src/kernels/decode.cu");
    println!("cargo:rerun-if-changed=src/kernels/flash_attention.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in ["decode", "flash_attention"] {
        let status = std::process::Command::new("nvcc")
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=sm_{cap}")])
            .arg(format!("src/kernels/{name}.cu"))
            .arg("-o")
            .arg(out.join(format!("{name}.ptx")))
            .status()
            .unwrap_or_else(|e| panic!("running nvcc (needed by the cuda feature): {e}"));
        assert!(status.success(), "nvcc failed on src/kernels/{name}.cu");
    }
}
