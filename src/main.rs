//! edgegate's binary: parse the command line, run, map the outcome to an exit code
//! (0 ok, 78 configuration error, 70 could not start / internal error).

use clap::Parser;

fn main() -> std::process::ExitCode {
    edgegate::cli::main_with(edgegate::cli::Cli::parse())
}
