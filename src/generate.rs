//! `qwen-mk generate`: greedy (or, with --sample, sampled) generation on the
//! GPU kernels or the CPU reference, streamed as text or reported as one
//! JSON object.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use crate::backend::Backend;
use crate::chat_template::{ChatTemplate, Message};
use crate::checkpoint::Checkpoint;
use crate::cli::GenerateArgs;
use crate::config::eos_token_ids;
use crate::model_source;
use crate::tokenizer::{max_text_bytes, Tokenizer};

pub fn run(args: &GenerateArgs) -> Result<()> {
    let load_start = Instant::now();
    let dir = model_source::resolve(&args.model.model)?;
    let checkpoint = Checkpoint::open(&dir)?;
    let config = &checkpoint.config;
    let limit = config.max_position_embeddings;
    if args.max_new_tokens == 0 || args.max_new_tokens > limit {
        bail!("--max-new-tokens must be between 1 and {limit} (the model's context)");
    }
    // Read once the context is known, which bounds the read; the wait for
    // the prompt is not loading time.
    let read_start = Instant::now();
    let prompt = read_prompt(args, limit)?;
    let prompt_wait = read_start.elapsed();
    if prompt.is_empty() {
        bail!("the prompt is empty; pass some text with --prompt or --prompt-file");
    }
    let tokenizer = Tokenizer::from_model_dir(&dir)?;
    let prompt_text = if args.chat {
        chat_prompt(args, &dir, &prompt)?
    } else {
        prompt
    };
    let prompt_ids = tokenizer.encode(&prompt_text)?;
    if prompt_ids.is_empty() {
        bail!("the prompt encodes to no tokens; pass some text with --prompt");
    }
    config
        .check_token_ids("the prompt", &prompt_ids)
        .context("tokenizer.json does not match the checkpoint")?;
    if prompt_ids.len() + args.max_new_tokens > limit {
        bail!(
            "the prompt ({} tokens) plus --max-new-tokens {} exceeds the model's context of {limit} tokens; shorten one of them",
            prompt_ids.len(),
            args.max_new_tokens
        );
    }
    let sampling = args.sampling.request(args.sample).resolve(&dir)?;
    let eos = if args.ignore_eos {
        Vec::new()
    } else {
        eos_token_ids(&dir)?
    };

    let mut stream = tokenizer.stream();
    let mut generated = Vec::new();
    let mut stdout = std::io::stdout().lock();
    let mut emit = |token: u32| -> Result<()> {
        generated.push(token);
        if !args.json {
            write!(stdout, "{}", stream.push(token)?)?;
            stdout.flush()?;
        }
        Ok(())
    };
    let context = prompt_ids.len() + args.max_new_tokens;
    let mut backend = Backend::open(
        &checkpoint,
        args.device,
        args.model.gpu,
        context,
        sampling,
        !args.token_by_token,
    )?;
    let load_ms = load_start
        .elapsed()
        .saturating_sub(prompt_wait)
        .as_secs_f64()
        * 1e3;
    let turn = backend.generate(&prompt_ids, args.max_new_tokens, &eos, &mut emit)?;
    let (first_token_ms, rest_ms) = (turn.first_token_ms, turn.rest_ms);
    let (device_name, prompt_note) = (backend.device_name(), turn.prompt_note);

    let hit_eos = generated.last().is_some_and(|t| eos.contains(t));
    let tokens_per_s = turn.decode_tokens_per_s(generated.len());
    if args.json {
        let report = json!({
            "model": dir.display().to_string(),
            "device": device_name,
            "prompt": prompt_text,
            "prompt_ids": prompt_ids,
            "generated_ids": generated,
            "text": tokenizer.decode(&generated)?,
            "stop_reason": if hit_eos { "eos" } else { "max_new_tokens" },
            "decoding": crate::sampling::describe(sampling),
            "timings": {
                "load_ms": load_ms,
                "first_token_ms": first_token_ms,
                "decode_ms": rest_ms,
                "decode_tokens_per_s": tokens_per_s,
            },
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(stdout)?;
        crate::status!(
            "[{} tokens{}; first after {first_token_ms:.1} ms (prompt of {} tokens{prompt_note}), then {tokens_per_s:.1} tok/s on {device_name}]",
            generated.len(),
            match sampling {
                None => String::new(),
                Some(s) => format!(" sampled at {s}, seed {}", s.seed),
            },
            prompt_ids.len(),
        );
    }
    Ok(())
}

/// The prompt wrapped as a user message (after --system's) in the model's
/// chat template.
fn chat_prompt(args: &GenerateArgs, dir: &Path, prompt: &str) -> Result<String> {
    let template = ChatTemplate::from_model_dir(dir)
        .context("--chat needs the model's chat template (or run without --chat)")?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", prompt));
    let text = template.render(&messages, args.no_think.then_some(false))?;
    if text.is_empty() {
        bail!("the model's chat template rendered nothing for this prompt; check its chat template, or run without --chat");
    }
    Ok(text)
}

/// The prompt: --prompt's text, or --prompt-file's contents (`-`: stdin),
/// read no further than a prompt that fits `context` tokens can reach (an
/// endless input, /dev/zero or `yes |`, is refused, not read until the
/// memory runs out).
fn read_prompt(args: &GenerateArgs, context: usize) -> Result<String> {
    let Some(path) = &args.prompt_file else {
        return Ok(args.prompt.clone().unwrap_or_default());
    };
    let (source, input): (String, Box<dyn Read>) = if path.as_os_str() == "-" {
        (
            "the prompt on standard input".to_string(),
            Box::new(std::io::stdin()),
        )
    } else {
        let source = format!("the prompt file {}", path.display());
        let file = File::open(path).with_context(|| format!("cannot read {source}"))?;
        (source, Box::new(file))
    };
    let limit = max_text_bytes(context);
    let mut bytes = Vec::new();
    input
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {source}"))?;
    if bytes.len() > limit {
        bail!(
            "{source} is over {limit} bytes, more than the model's context of {context} tokens can hold; shorten it"
        );
    }
    String::from_utf8(bytes).map_err(|_| anyhow!("{source} is not UTF-8 text"))
}
