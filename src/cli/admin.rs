//! Membership and the cluster at a glance: `meshdisk join`, `meshdisk
//! token create` and `meshdisk status`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::cli::{CliError, CredentialArg, render};
use crate::membership::ca::Role;
use crate::size::parse_duration;

#[derive(Args)]
pub struct JoinArgs {
    /// The directory's address (host:port).
    #[arg(long)]
    directory: String,
    #[arg(long, env = "MESHDISK_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Where to save the credential (never overwritten).
    #[arg(long)]
    credential: PathBuf,
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "client")]
    role: Role,
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Print a one-time join token.
    Create(TokenCreateArgs),
}

#[derive(Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    credential: CredentialArg,
    /// What the token lets a machine join as: peer, client or admin.
    #[arg(long, default_value = "peer")]
    role: Role,
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    ttl: Duration,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    credential: CredentialArg,
    #[arg(long)]
    json: bool,
}

/// `meshdisk join`: spends a join token and saves the credential.
pub async fn join(args: JoinArgs) -> Result<(), CliError> {
    if args.credential.exists() {
        return Err(CliError::AlreadyJoined(args.credential));
    }
    let cred = crate::client::join::join(&args.directory, &args.token, args.role, args.name).await?;
    cred.save(&args.credential)?;
    eprintln!(
        "joined cluster {} as {} {}; credential saved to {} (mode 0600)",
        cred.cluster,
        cred.role.as_str(),
        cred.node,
        args.credential.display()
    );
    Ok(())
}

/// `meshdisk token create`: prints the token on stdout, how to use it on
/// stderr.
pub async fn token_create(args: TokenCreateArgs) -> Result<(), CliError> {
    let c = args.credential.client()?;
    let (token, _) = c.create_token(args.role, args.ttl).await?;
    println!("{token}");
    let dir = &c.credential().directory;
    let how = match args.role {
        Role::Peer => format!("meshdisk peer --directory {dir} --join TOKEN --data DIR --capacity SIZE"),
        _ => format!(
            "meshdisk join --directory {dir} --token TOKEN --credential FILE --role {}",
            args.role.as_str()
        ),
    };
    eprintln!("one-time token for a {}, valid {:?}; use it as:\n  {how}", args.role.as_str(), args.ttl);
    Ok(())
}

/// `meshdisk status`.
pub async fn status(args: StatusArgs) -> Result<(), CliError> {
    let s = args.credential.client()?.status().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", render::status(&s));
    }
    Ok(())
}
