//! The `qwen-mk` command. Every failure ends in one line on stderr and a
//! non-zero exit: 1 for errors, and for `parity` 1 on a failed comparison and
//! 2 when the comparison could not be set up.

use std::process::ExitCode;

use clap::Parser;
use qwen_mk::cli::{Cli, Command};
use qwen_mk::{bench, chat, generate, parity, synthetic};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(args) => generate::run(args).map(|()| ExitCode::SUCCESS),
        Command::Chat(args) => chat::run(args).map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => bench::run(args).map(|()| ExitCode::SUCCESS),
        Command::Parity(args) => match parity::run(args) {
            Ok(true) => Ok(ExitCode::SUCCESS),
            Ok(false) => Ok(ExitCode::from(1)),
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        },
        Command::Synth(args) => {
            let spec = synthetic::SyntheticSpec {
                shape: args.shape,
                seed: args.seed,
                tied: !args.untied,
                head: args.head,
            };
            synthetic::write_checkpoint(&args.out, &args.assets, &spec).map(|()| {
                eprintln!(
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
        eprintln!("error: {e:#}");
        ExitCode::from(1)
    })
}
