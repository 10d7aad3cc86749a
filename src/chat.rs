//! `qwen-mk chat`: a conversation on the command line. Each line on stdin is
//! one user message; the answer is streamed to stdout as it decodes, and
//! joins the conversation. Every turn renders the whole conversation with
//! the model's chat template (which, for Qwen3, drops the thinking of
//! earlier answers), so the prompt is always what a fresh run would see; the
//! keys and values of the positions where it begins as the last turn's
//! sequence did stay in the cache, and only the rest (the last answer, as
//! the template rewrote it, and the new message) goes through prefill.
//!
//! `/clear` starts a new conversation (keeping --system), `/exit`, `/quit`
//! or the end of input ends. A message that would not fit the context, or
//! a line that is not UTF-8 text, is refused with an error line, and the
//! conversation goes on; a line longer than any conversation of the context
//! could be (/dev/zero on stdin) ends it with an error.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::backend::Backend;
use crate::chat_template::{ChatTemplate, Message};
use crate::checkpoint::Checkpoint;
use crate::cli::ChatArgs;
use crate::config::eos_token_ids;
use crate::model_source;
use crate::tokenizer::{max_text_bytes, Tokenizer};

/// Answers stop here unless --max-new-tokens (or a smaller context) says
/// otherwise.
const DEFAULT_MAX_NEW_TOKENS: usize = 2048;

pub fn run(args: &ChatArgs) -> Result<()> {
    let load_start = Instant::now();
    let dir = model_source::resolve(&args.model.model)?;
    let checkpoint = Checkpoint::open(&dir)?;
    let limit = checkpoint.config.max_position_embeddings;
    let context = args.context.unwrap_or(limit);
    if !(2..=limit).contains(&context) {
        bail!("--context must be between 2 and {limit} (the model's context)");
    }
    let max_new_tokens = args
        .max_new_tokens
        .unwrap_or(DEFAULT_MAX_NEW_TOKENS.min(context - 1));
    if max_new_tokens == 0 || max_new_tokens >= context {
        bail!(
            "--max-new-tokens must be between 1 and {} (less than the context of {context})",
            context - 1
        );
    }
    let tokenizer = Tokenizer::from_model_dir(&dir)?;
    let template =
        ChatTemplate::from_model_dir(&dir).context("chat needs the model's chat template")?;
    let sampling = args.sampling.request(true).resolve(&dir)?;
    let eos = eos_token_ids(&dir)?;
    let mut backend = Backend::open(
        &checkpoint,
        args.device,
        args.model.gpu,
        context,
        sampling,
        !args.token_by_token,
    )?;
    let thinking = args.no_think.then_some(false);
    let start: Vec<Message> = args
        .system
        .iter()
        .map(|system| Message::new("system", system))
        .collect();
    let mut messages = start.clone();

    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        crate::status!(
            "[{} on {}, loaded in {:.1} s, {}; /clear starts over, /exit or Ctrl-D ends]",
            dir.display(),
            backend.device_name(),
            load_start.elapsed().as_secs_f64(),
            match sampling {
                None => "greedy".to_string(),
                Some(s) => format!("sampling at {s}"),
            }
        );
    }
    let mut lines = stdin.lock();
    let line_limit = max_text_bytes(context);
    let mut line_number = 0;
    let mut turn = 0;
    loop {
        if interactive {
            // The prompt, like a status line, is best effort (crate::status).
            let mut stderr = std::io::stderr();
            let _ = write!(stderr, "> ").and_then(|()| stderr.flush());
        }
        line_number += 1;
        let line = match read_line(&mut lines, line_limit)? {
            InputLine::End => break,
            InputLine::Text(text) => text,
            InputLine::NotUtf8 => {
                crate::status!("error: line {line_number} of standard input is not UTF-8 text; it is skipped");
                continue;
            }
            InputLine::TooLong => bail!(
                "line {line_number} of standard input is over {line_limit} bytes, more than a conversation of {context} tokens can hold (chat reads one message a line)"
            ),
        };
        let text = line.trim_end_matches(['\n', '\r']);
        match text.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/clear" => {
                messages = start.clone();
                crate::status!("[a new conversation]");
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", text));
        let prompt_ids = tokenizer.encode(&template.render(&messages, thinking)?)?;
        if prompt_ids.is_empty() {
            bail!("the model's chat template rendered nothing for this conversation; check its chat template");
        }
        checkpoint
            .config
            .check_token_ids("the conversation", &prompt_ids)
            .context("tokenizer.json does not match the checkpoint")?;
        // The decoder holds the prompt and every answer token but the last.
        let room = (context + 1).saturating_sub(prompt_ids.len());
        if room == 0 {
            messages.pop();
            let larger = if context < limit {
                ", or run with a larger --context"
            } else {
                ""
            };
            crate::status!(
                "error: with this message the conversation is {} tokens, more than the context of {context}; /clear to start over{larger}",
                prompt_ids.len()
            );
            continue;
        }

        let mut answer = Vec::new();
        let mut stream = tokenizer.stream();
        let mut stdout = std::io::stdout().lock();
        let emit = |token: u32| -> Result<()> {
            answer.push(token);
            if !args.json && !eos.contains(&token) {
                write!(stdout, "{}", stream.push(token)?)?;
                stdout.flush()?;
            }
            Ok(())
        };
        let timings = backend.generate(&prompt_ids, max_new_tokens.min(room), &eos, emit)?;
        let hit_eos = answer.last().is_some_and(|t| eos.contains(t));
        let text = tokenizer.decode(&answer[..answer.len() - usize::from(hit_eos)])?;
        messages.push(Message::new("assistant", &text));
        turn += 1;

        let tokens_per_s = timings.decode_tokens_per_s(answer.len());
        if args.json {
            let report = json!({
                "turn": turn,
                "prompt_tokens": prompt_ids.len(),
                "reused_tokens": timings.reused_tokens,
                "generated_ids": answer,
                "text": text,
                "stop_reason": if hit_eos { "eos" } else { "max_new_tokens" },
                "decoding": crate::sampling::describe(sampling),
                "timings": {
                    "first_token_ms": timings.first_token_ms,
                    "decode_ms": timings.rest_ms,
                    "decode_tokens_per_s": tokens_per_s,
                },
            });
            writeln!(stdout, "{report}")?;
        } else {
            writeln!(stdout)?;
            crate::status!(
                "[{} tokens{}; first after {:.1} ms (conversation of {} tokens, {} new{}), then {tokens_per_s:.1} tok/s]",
                answer.len(),
                if hit_eos { "" } else { ", cut at --max-new-tokens" },
                timings.first_token_ms,
                prompt_ids.len(),
                prompt_ids.len() - timings.reused_tokens,
                timings.prompt_note,
            );
        }
    }
    Ok(())
}

/// One line of the input, as `read_line` found it.
enum InputLine {
    /// The line, its end of line included.
    Text(String),
    NotUtf8,
    /// Over the limit without an end of line (the rest is not read).
    TooLong,
    End,
}

/// Reads one line of `input`, but no more than `limit` bytes of it.
fn read_line(input: &mut impl BufRead, limit: usize) -> Result<InputLine> {
    let mut bytes = Vec::new();
    input
        .by_ref()
        .take(limit as u64 + 1)
        .read_until(b'\n', &mut bytes)
        .context("cannot read standard input")?;
    if bytes.is_empty() {
        return Ok(InputLine::End);
    }
    if bytes.len() > limit && bytes.last() != Some(&b'\n') {
        return Ok(InputLine::TooLong);
    }
    Ok(String::from_utf8(bytes).map_or(InputLine::NotUtf8, InputLine::Text))
}
