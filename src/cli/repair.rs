//! `meshdisk repair`: what the directory's repair is doing, and `--wait`
//! to follow it (a progress bar with rate and ETA) until every segment has
//! its full redundancy back.
//!
//! Repair needs no command to start: the directory rebuilds what is
//! missing by itself (`docs/ARCHITECTURE.md`, "Repair"). This command only
//! watches.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::api::{ClusterStatus, Verdict};
use crate::cli::{CliError, CredentialArg, render};
use crate::size::{human, parse_duration};

#[derive(Args)]
pub struct RepairArgs {
    #[command(flatten)]
    credential: CredentialArg,
    /// Follow repair until every segment is back to full redundancy (or
    /// as full as the peers that are up allow).
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long (exit status 1).
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    timeout: Duration,
    /// Print the cluster's status as JSON (with --wait: once done).
    #[arg(long)]
    json: bool,
}

/// Whether nothing is left for repair to do: no segment below its
/// threshold, critical or misplaced, nothing queued or in flight.
/// Segments only degraded (a holder down, not yet lost) do not count: they
/// wait for their peer.
fn settled(s: &ClusterStatus) -> bool {
    s.health.to_repair.segments == 0 && s.repair.queued.segments == 0 && s.repair.in_flight == 0
}

/// The error for a cluster that cannot be repaired fully.
fn unrepairable(s: &ClusterStatus) -> Option<CliError> {
    (s.verdict == Verdict::DataLost).then(|| {
        CliError::Argument(format!(
            "{} segments have fewer than k shards on peers that are not lost: repair cannot rebuild them (bring a lost peer back if you can)",
            s.health.lost
        ))
    })
}

/// `meshdisk repair`.
pub async fn run(args: RepairArgs) -> Result<(), CliError> {
    let client = args.credential.client()?;
    let mut s = client.status().await?;
    if !args.wait {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            println!("{}", render::verdict_line(&s));
            println!("segments: {}", render::health_line(&s.health));
            println!("{}", render::repair_line(&s.repair));
        }
        return Ok(());
    }
    let start = Instant::now();
    let base = s.repair.bytes;
    let tty = std::io::stderr().is_terminal() && !args.json;
    let bar = if tty { ProgressBar::new(0) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} repair [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let mut last_line = Instant::now();
    loop {
        let done = s.repair.bytes - base;
        // What is left to rebuild: the scan's count now, or the queue's
        // when it is larger (the scan and the queue are a round apart).
        let left = s.health.to_repair.bytes.max(s.repair.queued.bytes);
        bar.set_length(done + left);
        bar.set_position(done);
        bar.set_message(format!(
            "{} segments left, {} critical",
            s.health.to_repair.segments.max(s.repair.queued.segments + s.repair.in_flight),
            s.health.critical
        ));
        if !tty && !args.json && last_line.elapsed() >= Duration::from_secs(5) {
            eprintln!("repair: {} rebuilt, {} left, {}/s", human(done), human(left), human(s.repair.rate));
            last_line = Instant::now();
        }
        if settled(&s) {
            break;
        }
        if let Some(e) = unrepairable(&s) {
            bar.abandon();
            return Err(e);
        }
        if start.elapsed() >= args.timeout {
            bar.abandon();
            return Err(CliError::Argument(format!(
                "repair is not done after {}: {}",
                render::eta(args.timeout.as_secs()),
                render::verdict_line(&s)
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        s = client.status().await?;
    }
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "repair done in {}: {} rebuilt; {}",
            render::eta(start.elapsed().as_secs()),
            human(s.repair.bytes - base),
            render::verdict_line(&s)
        );
    }
    if let Some(e) = unrepairable(&s) {
        return Err(e);
    }
    Ok(())
}
