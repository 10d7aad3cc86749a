//! The `qwen-mk` command. Every failure ends in one line on stderr and a
//! non-zero exit: 1 for errors, and for `parity` 1 on a failed comparison and
//! 2 when the comparison could not be set up. Output cut short because its
//! reader went away is not reported (see BROKEN_PIPE).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use qwen_mk::cli::{Cli, Command};
use qwen_mk::{bench, chat, generate, parity, synthetic};

/// The exit status when stdout's reader has gone (`qwen-mk ... | head`):
/// nothing is printed, since the reader chose to stop, but the status is
/// the one a shell reports for a program that SIGPIPE ends (128 + 13), as
/// C tools give, so that a script with `set -o pipefail` still sees that the
/// output was cut short.
const BROKEN_PIPE: u8 = 141;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The exit status of a run that fails with an error.
    let mut error_status = 1;
    let result = match &cli.command {
        Command::Generate(args) => generate::run(args).map(|()| ExitCode::SUCCESS),
        Command::Chat(args) => chat::run(args).map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => bench::run(args).map(|()| ExitCode::SUCCESS),
        Command::Parity(args) => {
            error_status = 2;
            parity::run(args).map(|pass| ExitCode::from(if pass { 0 } else { 1 }))
        }
        Command::Synth(args) => {
            let spec = synthetic::SyntheticSpec {
                shape: args.shape,
                seed: args.seed,
                tied: !args.untied,
                head: args.head,
            };
            synthetic::write_checkpoint(&args.out, &args.assets, &spec).map(|()| {
                qwen_mk::status!(
                    "wrote a synthetic {:?} checkpoint (seed {}) to {}",
                    args.shape,
                    args.seed,
                    args.out.display()
                );
                ExitCode::SUCCESS
            })
        }
    };
    result.unwrap_or_else(|e| {
        if is_broken_pipe(&e) {
            return ExitCode::from(BROKEN_PIPE);
        }
        // Ignored if stderr is gone too: there is nowhere left to say it.
        let _ = writeln!(std::io::stderr(), "error: {}", one_line(&e));
        ExitCode::from(error_status)
    })
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes, outermost first, on one line. A cause whose
/// text an outer message already holds is left out: some libraries' errors
/// (hf-hub's) repeat their source's text, which would print the same URL
/// and reason three times.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(text.as_str()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    // A message of several lines (from a library) still prints as one.
    line.lines()
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
