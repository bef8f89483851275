//! The `linkmesh-agent` command: parse, dispatch, map failures to exit codes.

#![deny(rust_2018_idioms, missing_docs, clippy::disallowed_methods)]
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser as _;
use linkmesh_agent::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}
