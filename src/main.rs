//! The `cellstream` command line (DESIGN.md §8). Each subcommand lives in `cli/`.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cellstream",
    version,
    about = "Single-cell count batches → scGPT tokens, embeddings and labels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Embed and label every cell of the given batches; NDJSON records on stdout or --out.
    Embed(cli::embed::Args),
    /// Tokenize a batch exactly as scGPT does and write one JSON line per cell.
    Tokenize(cli::tokenize::Args),
    /// Convert any readable batch to the native .csb (or .csb.zst) format.
    Convert(cli::convert::Args),
    /// Show what a batch, a model package or a reference contains, validated.
    Inspect(cli::inspect::Args),
    /// Embed labelled cells into a reference folder for kNN labels (`embed --reference`).
    Reference(cli::reference::Args),
    /// Run the daemon: watch a spool folder, stream results, serve metrics (DESIGN.md §6).
    Serve(cli::serve::Args),
    /// Send batches to the daemons' NATS JetStream work stream, one per input (DESIGN.md §6).
    Submit(cli::submit::Args),
    /// The daemon's child reader (`cellstream::batch::isolated`); not for people.
    #[command(name = "__read-child", hide = true)]
    ReadChild(cli::read_child::Args),
}

fn main() -> ExitCode {
    let args = Cli::parse();
    let result = match args.command {
        Command::Embed(a) => cli::embed::run(a),
        Command::Tokenize(a) => cli::tokenize::run(a),
        Command::Convert(a) => cli::convert::run(a),
        Command::Inspect(a) => cli::inspect::run(a),
        Command::Reference(a) => cli::reference::run(a),
        Command::Serve(a) => cli::serve::run(a),
        Command::Submit(a) => cli::submit::run(a),
        Command::ReadChild(a) => cli::read_child::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cellstream: error: {err:#}");
            ExitCode::from(cli::exit_code(&err))
        }
    }
}
