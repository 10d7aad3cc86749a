//! Compiles every `kernels/*.cu` into one fatbin per file, holding machine
//! code for each target architecture, and embeds the fatbins in the binary.
//! cudarc loads them at run time, so no CUDA toolkit is needed to run qwen-mk.
//!
//! Environment:
//! - `NVCC`: path of nvcc; else `$CUDA_HOME/bin/nvcc`, then `nvcc` on `PATH`,
//!   then `/usr/local/cuda/bin/nvcc`.
//! - `QWEN_MK_CUDA_ARCHS`: comma-separated targets (default `90a,120a`:
//!   Hopper and RTX 5090).
//!
//! The ptxas resource report (registers, shared memory, spills) of every
//! kernel is written to `target/<profile>/kernel-resources.txt`.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(dead_code)]
mod kernel_dims {
    include!("src/kernel_dims.rs");
}

const DEFAULT_ARCHS: &str = "90a,120a";

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=src/kernel_dims.rs");
    for var in ["NVCC", "CUDA_HOME", "QWEN_MK_CUDA_ARCHS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Err(message) = build() {
        // One readable message instead of a backtrace.
        eprintln!("\nerror: {message}\n");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let nvcc = find_nvcc().ok_or_else(|| {
        "qwen-mk needs nvcc (CUDA toolkit 12.8 or newer) to compile its kernels, and none was found \
         in $NVCC, $CUDA_HOME/bin, PATH or /usr/local/cuda/bin. Install the CUDA toolkit, or run \
         `pip install nvidia-cuda-nvcc==13.0.88 'nvidia-cuda-crt==13.0.*' 'nvidia-cuda-runtime==13.0.*' \
         'nvidia-nvvm==13.0.*' 'nvidia-cuda-cccl==13.0.*'` and set NVCC=<site-packages>/nvidia/cu13/bin/nvcc"
            .to_string()
    })?;
    let archs = env::var("QWEN_MK_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());

    let mut sources: Vec<PathBuf> = fs::read_dir("kernels")
        .map_err(|e| format!("cannot read kernels/: {e}"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();

    let mut embedded = String::new();
    let mut report = String::new();
    for source in &sources {
        let stem = source
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or("kernel file name is not UTF-8")?;
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        let ptxas_report = compile(&nvcc, source, &fatbin, &archs)?;
        writeln!(report, "==== {}\n{ptxas_report}", source.display()).ok();
        writeln!(
            embedded,
            "pub const {}: &[u8] = include_bytes!({:?});",
            stem.to_uppercase(),
            fatbin.display().to_string()
        )
        .ok();
    }
    writeln!(embedded, "pub const CUDA_ARCHS: &str = {archs:?};").ok();
    fs::write(out_dir.join("kernels.rs"), embedded).map_err(|e| e.to_string())?;
    // The tests read ptxas's report (registers, shared memory per kernel).
    fs::write(out_dir.join("kernel-resources.txt"), &report).map_err(|e| e.to_string())?;

    // OUT_DIR is target/<profile>/build/<pkg>-<hash>/out.
    if let Some(profile_dir) = out_dir.ancestors().nth(3) {
        fs::write(profile_dir.join("kernel-resources.txt"), &report).ok();
    }
    Ok(())
}

fn compile(nvcc: &Path, source: &Path, fatbin: &Path, archs: &str) -> Result<String, String> {
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .args([
            "-O3",
            "-std=c++17",
            "-lineinfo",
            "-Xptxas",
            "-v",
            "-Ikernels",
        ])
        .arg("-o")
        .arg(fatbin)
        .arg(source);
    for arch in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        // The -gencode form keeps arch-specific (the "a") instructions valid.
        cmd.arg(format!("-gencode=arch=compute_{arch},code=sm_{arch}"));
    }
    for (name, value) in kernel_dims::KERNEL_DEFINES {
        cmd.arg(format!("-D{name}={value}"));
    }
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(format!("nvcc failed on {}:\n{stderr}", source.display()));
    }
    Ok(stderr)
}

fn find_nvcc() -> Option<PathBuf> {
    let from_env = env::var_os("NVCC").map(PathBuf::from);
    let from_cuda_home = env::var_os("CUDA_HOME").map(|home| Path::new(&home).join("bin/nvcc"));
    let from_path = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join("nvcc"))
            .find(|p| p.is_file())
    });
    [
        from_env,
        from_cuda_home,
        from_path,
        Some(PathBuf::from("/usr/local/cuda/bin/nvcc")),
    ]
    .into_iter()
    .flatten()
    .find(|path| path.is_file())
}
