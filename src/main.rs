//! The `meshdisk` command: parses the command line, sets up logging and
//! the async runtime, and hands the command to [`meshdisk::cli`], where
//! every command lives. An error is printed once, as `meshdisk: error:
//! MESSAGE`, with exit status 1.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use meshdisk::cli::bench::BenchCommand;
use meshdisk::cli::{self, Cli, CliError, Command};

fn main() -> ExitCode {
    meshdisk::sys::keep_large_buffers();
    let cli = Cli::parse();
    let result = match cli.command {
        // Commands that need no async runtime (and log nothing).
        Command::Key(cmd) => cli::volume::key(&cmd),
        Command::Detach(args) => cli::attach::detach(&args),
        Command::Bench(BenchCommand::Codec(args)) => cli::bench::codec(&args, cli.threads),
        Command::Bench(BenchCommand::Compaction(args)) => cli::bench::compaction(&args),
        command => {
            let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            // A closed stderr (the parent that read it died) must not turn
            // every log line into a panic: tracing-subscriber reports a
            // failed write with `eprintln!`, which panics, and a task that
            // panics mid-shutdown leaves the process running for good.
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .log_internal_errors(false)
                .init();
            runtime(cli.threads).and_then(|rt| {
                let result = rt.block_on(cli::run(command, cli.threads));
                // Not a plain drop, which waits without end for blocking
                // tasks still running (a disk call, an encoder): the
                // command has finished, what is left is abandoned.
                rt.shutdown_timeout(RUNTIME_SHUTDOWN);
                result
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`, which panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "meshdisk: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How long the runtime waits for its blocking tasks once the command has
/// returned.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(2);

/// `--threads`: 0 is one worker per core; 1 runs everything on this
/// thread (no cross-thread wake-ups).
fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, CliError> {
    let built = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b.enable_all().build()
    };
    built.map_err(CliError::Runtime)
}
