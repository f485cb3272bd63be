//! `meshdisk scrub`: what the peers' scrub is doing (`status`), and the
//! cluster-wide controls: `pause [--for DURATION]` (a pause with a
//! duration ends by itself), `resume`, and `start` (a pass now on every
//! peer, at its `--scrub-rate`).
//!
//! Scrub needs no command to run: every peer re-hashes all it holds about
//! every `--scrub-every` (`docs/ARCHITECTURE.md`, "Scrub").

use std::time::Duration;

use clap::{Args, Subcommand};

use crate::api::{DirRequest, DirResponse, ScrubCommand};
use crate::cli::{CliError, CredentialArg, render};
use crate::size::{human, parse_duration};

#[derive(Subcommand)]
pub enum ScrubAction {
    /// The peers' scrub progress, bad shards found.
    Status(StatusArgs),
    /// Pause every peer's scrub (until `resume`, or for --for).
    Pause(PauseArgs),
    /// Resume a paused scrub.
    Resume(CredentialOnly),
    /// Start a pass now on every peer (lifts a pause).
    Start(CredentialOnly),
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    credential: CredentialArg,
    /// Print the cluster's scrub summary and each peer's report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PauseArgs {
    #[command(flatten)]
    credential: CredentialArg,
    /// Resume by itself after this long (e.g. 2h).
    #[arg(long = "for", value_parser = parse_duration)]
    duration: Option<Duration>,
}

#[derive(Args)]
pub struct CredentialOnly {
    #[command(flatten)]
    credential: CredentialArg,
}

async fn command(credential: &CredentialArg, cmd: ScrubCommand) -> Result<(), CliError> {
    match credential.client()?.directory(&DirRequest::Scrub(cmd)).await? {
        DirResponse::Done => Ok(()),
        other => Err(CliError::Argument(format!("the directory answered {other:?}"))),
    }
}

/// `meshdisk scrub`.
pub async fn run(action: ScrubAction) -> Result<(), CliError> {
    match action {
        ScrubAction::Status(args) => {
            let s = args.credential.client()?.status().await?;
            if args.json {
                let peers: Vec<_> =
                    s.peers.iter().map(|p| serde_json::json!({ "name": p.name, "scrub": p.scrub })).collect();
                let out = serde_json::json!({ "scrub": s.scrub, "peers": peers });
                println!("{}", serde_json::to_string_pretty(&out)?);
                return Ok(());
            }
            println!("{}", render::scrub_line(&s));
            for p in &s.peers {
                let Some(r) = &p.scrub else { continue };
                let pass = match r.pass_started_ms {
                    Some(_) => {
                        format!("{} of {} checked at {}/s", human(r.checked), human(r.total), human(r.rate))
                    }
                    None => "between passes".into(),
                };
                println!(
                    "  {}: {pass}; {} passes; {} bad found, {} not reported{}",
                    p.name,
                    r.passes,
                    r.found,
                    r.unreported,
                    if r.paused { "; paused" } else { "" }
                );
            }
            Ok(())
        }
        ScrubAction::Pause(args) => {
            let for_ms = args.duration.map(|d| d.as_millis() as u64);
            command(&args.credential, ScrubCommand::Pause { for_ms }).await?;
            match args.duration {
                Some(d) => println!("scrub paused for {}", render::eta(d.as_secs())),
                None => println!("scrub paused until `meshdisk scrub resume`"),
            }
            Ok(())
        }
        ScrubAction::Resume(args) => {
            command(&args.credential, ScrubCommand::Resume).await?;
            println!("scrub resumed");
            Ok(())
        }
        ScrubAction::Start(args) => {
            command(&args.credential, ScrubCommand::Start).await?;
            println!("scrub pass asked for: every peer starts one at its next heartbeat");
            Ok(())
        }
    }
}
