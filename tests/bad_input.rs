//! Bad input gets one line on stderr naming the problem, a non-zero exit,
//! and never a panic.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{assert_one_line_error, generate, qwen_mk, tiny_checkpoint, CPU_PROMPT};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// Rewrites model.safetensors with `edit` applied to the list of tensors.
fn rewrite_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let parsed = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = parsed
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &path).unwrap();
}

#[test]
fn a_good_tiny_checkpoint_runs() {
    let dir = tiny_checkpoint(3, true);
    let out = generate(dir.path(), CPU_PROMPT);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn missing_directory() {
    let out = qwen_mk(&["generate", "--model", "/nonexistent/qwen", "--prompt", "hi"]);
    assert_one_line_error(&out, "does not exist");
}

#[test]
fn missing_config() {
    let dir = tiny_checkpoint(3, true);
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    assert_one_line_error(&generate(dir.path(), CPU_PROMPT), "no config.json");
}

#[test]
fn missing_tokenizer() {
    let dir = tiny_checkpoint(3, true);
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    assert_one_line_error(&generate(dir.path(), CPU_PROMPT), "no tokenizer.json");
}

#[test]
fn missing_weights_file() {
    let dir = tiny_checkpoint(3, true);
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    assert_one_line_error(&generate(dir.path(), CPU_PROMPT), "weights are missing");
}

#[test]
fn missing_tensor() {
    let dir = tiny_checkpoint(3, true);
    rewrite_tensors(dir.path(), |t| {
        t.retain(|(name, ..)| name != "model.layers.1.mlp.up_proj.weight")
    });
    assert_one_line_error(
        &generate(dir.path(), CPU_PROMPT),
        "no tensor model.layers.1.mlp.up_proj.weight",
    );
}

#[test]
fn untied_config_without_lm_head() {
    let dir = tiny_checkpoint(3, true);
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    std::fs::write(&path, text).unwrap();
    assert_one_line_error(
        &generate(dir.path(), CPU_PROMPT),
        "no tensor lm_head.weight",
    );
}

#[test]
fn wrong_shape() {
    let dir = tiny_checkpoint(3, true);
    rewrite_tensors(dir.path(), |t| {
        let q = t
            .iter_mut()
            .find(|(n, ..)| n == "model.layers.0.self_attn.q_norm.weight")
            .unwrap();
        q.2 = vec![8, 2];
    });
    assert_one_line_error(
        &generate(dir.path(), CPU_PROMPT),
        "has shape [8, 2], but config.json implies [16]",
    );
}

#[test]
fn wrong_dtype() {
    let dir = tiny_checkpoint(3, true);
    rewrite_tensors(dir.path(), |t| {
        let q = t
            .iter_mut()
            .find(|(n, ..)| n == "model.norm.weight")
            .unwrap();
        q.1 = Dtype::F16;
    });
    assert_one_line_error(&generate(dir.path(), CPU_PROMPT), "bf16 checkpoints only");
}

#[test]
fn truncated_safetensors() {
    let dir = tiny_checkpoint(3, true);
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    assert_one_line_error(&generate(dir.path(), CPU_PROMPT), "truncated or corrupt");
}

#[test]
fn corrupt_safetensors_header() {
    let dir = tiny_checkpoint(3, true);
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&path, bytes).unwrap();
    assert_one_line_error(&generate(dir.path(), CPU_PROMPT), "truncated or corrupt");
}

#[test]
fn foreign_model_type() {
    let dir = tiny_checkpoint(3, true);
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"qwen3\"", "\"llama\"");
    std::fs::write(&path, text).unwrap();
    assert_one_line_error(&generate(dir.path(), CPU_PROMPT), "model_type is \"llama\"");
}

#[test]
fn empty_prompt() {
    let dir = tiny_checkpoint(3, true);
    let out = generate(dir.path(), &["--prompt", "", "--device", "cpu"]);
    assert_one_line_error(&out, "prompt is empty");
}

#[test]
fn zero_and_absurd_token_counts() {
    let dir = tiny_checkpoint(3, true);
    for n in ["0", "1000000000"] {
        let out = generate(
            dir.path(),
            &["--prompt", "hi", "--max-new-tokens", n, "--device", "cpu"],
        );
        assert_one_line_error(&out, "--max-new-tokens must be between 1 and 40960");
    }
    let out = generate(
        dir.path(),
        &[
            "--prompt",
            "hi",
            "--max-new-tokens",
            "-3",
            "--device",
            "cpu",
        ],
    );
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn prompt_past_the_context() {
    let dir = tiny_checkpoint(3, true);
    let out = generate(
        dir.path(),
        &[
            "--prompt",
            "hello there",
            "--max-new-tokens",
            "40960",
            "--device",
            "cpu",
        ],
    );
    assert_one_line_error(&out, "exceeds the model's context of 40960 tokens");
}

#[test]
fn bench_past_the_context() {
    // One step from 40,950 fits the 40,960 positions, but bench also replays
    // it in a CUDA graph of 16 steps, which does not: refused before the GPU.
    let dir = tiny_checkpoint(3, true);
    let model = dir.path().to_str().unwrap();
    let out = qwen_mk(&[
        "bench",
        "--model",
        model,
        "--positions",
        "40950",
        "--steps",
        "1",
    ]);
    assert_one_line_error(
        &out,
        "position 40950 plus 1 steps (replayed in CUDA graphs of 16, so 40966 positions), or a prompt of 8192, exceeds the model's context of 40960 tokens",
    );
}

#[test]
fn gpu_kernels_refuse_other_shapes_before_touching_the_gpu() {
    let dir = tiny_checkpoint(3, true);
    let out = generate(dir.path(), &["--prompt", "hi", "--device", "cuda"]);
    assert_one_line_error(&out, "hidden_size: checkpoint has 64, kernels need 1024");
}

#[test]
fn cuda_without_a_gpu() {
    // A checkpoint of the real shape, so the dimension check passes and the
    // GPU is what is missing.
    let dir = common::full_size_checkpoint(1);
    // Batched prefill (the default) and the token-by-token prompt path.
    for prompt_path in [None, Some("--token-by-token")] {
        let mut args = vec![
            "--prompt",
            "hi",
            "--max-new-tokens",
            "1",
            "--device",
            "cuda",
        ];
        args.extend(prompt_path);
        works_or_has_no_driver(&generate(dir.path(), &args));
    }
    // `chat` opens the GPU before it reads a message (stdin is empty here).
    works_or_has_no_driver(&qwen_mk(&["chat", "--model", dir.path().to_str().unwrap()]));
}

/// Without a driver, a one-line error saying so; on a GPU machine the same
/// command must simply work.
fn works_or_has_no_driver(out: &std::process::Output) {
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        assert_one_line_error(out, "no NVIDIA driver found");
    }
}

#[test]
fn sampling_settings_out_of_range() {
    let dir = tiny_checkpoint(3, true);
    for (args, needle) in [
        (&["--top-k", "65"][..], "--top-k must be between 1 and 64"),
        (&["--top-k", "0"][..], "--top-k must be between 1 and 64"),
        (&["--top-p", "0"][..], "--top-p must be in (0, 1]"),
        (
            &["--temperature", "-0.5"][..],
            "--temperature must be a positive number",
        ),
        (
            &["--temperature", "inf"][..],
            "--temperature must be a positive number",
        ),
    ] {
        let mut all = vec!["--prompt", "hi", "--device", "cpu"];
        all.extend_from_slice(args);
        assert_one_line_error(&generate(dir.path(), &all), needle);
    }
}
