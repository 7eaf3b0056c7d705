//! The `plugind` command: parses arguments and hands over to the library.

use clap::Parser;

/// plugind hosts native plugins and delivers messages to them reliably.
#[derive(Debug, Parser)]
#[command(name = "plugind", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
