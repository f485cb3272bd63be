//! Reading a passphrase: from `MESHDISK_PASSPHRASE`, else from the
//! terminal with echo off. Never from the command line, where other users
//! could read it in the process list.
//!
//! Hand-written rather than a crate (e.g. rpassword): it is one termios
//! call each way, and we want the passphrase in a `Zeroizing` buffer.

use zeroize::Zeroizing;

/// The environment variable scripts use to pass a passphrase.
pub const ENV: &str = "MESHDISK_PASSPHRASE";

#[derive(Debug, thiserror::Error)]
pub enum PassphraseError {
    #[error("the two passphrases differ; nothing was changed")]
    Differ,
    #[error("the passphrase is empty")]
    Empty,
    /// With the environment variable that would have given it.
    #[error("no terminal to ask for the passphrase: set {0}")]
    NoTerminal(&'static str),
    #[error("cannot turn off echo on the terminal: set {0}")]
    NoEcho(&'static str),
    #[error("reading the passphrase: {0}")]
    Read(std::io::Error),
}

/// Where scripts (and tests) pass the new passphrase of `volume passwd`.
pub const NEW_ENV: &str = "MESHDISK_NEW_PASSPHRASE";

/// Reads a passphrase; with `confirm`, asks twice and requires a match.
pub fn read(prompt: &str, confirm: bool) -> Result<Zeroizing<String>, PassphraseError> {
    read_from(ENV, prompt, confirm)
}

/// Reads the new passphrase of `volume passwd`: from [`NEW_ENV`], else
/// asked twice on the terminal.
pub fn read_new(prompt: &str) -> Result<Zeroizing<String>, PassphraseError> {
    read_from(NEW_ENV, prompt, true)
}

fn read_from(env: &'static str, prompt: &str, confirm: bool) -> Result<Zeroizing<String>, PassphraseError> {
    if let Ok(p) = std::env::var(env) {
        return check(Zeroizing::new(p));
    }
    let first = prompt_tty(env, prompt)?;
    if confirm {
        let again = prompt_tty(env, "again: ")?;
        if *first != *again {
            return Err(PassphraseError::Differ);
        }
    }
    check(first)
}

fn check(p: Zeroizing<String>) -> Result<Zeroizing<String>, PassphraseError> {
    if p.is_empty() {
        return Err(PassphraseError::Empty);
    }
    Ok(p)
}

fn prompt_tty(env: &'static str, prompt: &str) -> Result<Zeroizing<String>, PassphraseError> {
    use std::io::{BufRead, Write};
    use std::os::fd::AsRawFd;
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| PassphraseError::NoTerminal(env))?;
    let fd = tty.as_raw_fd();
    // SAFETY: termios is plain data; tcgetattr fills it for an open fd.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `saved` is a valid termios to fill.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Err(PassphraseError::NoEcho(env));
    }
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    // SAFETY: as above, with a termios derived from the saved one.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    let mut out = &tty;
    let _ = write!(out, "{prompt}");
    let _ = out.flush();
    let mut line = Zeroizing::new(String::new());
    let read = std::io::BufReader::new(&tty).read_line(&mut line);
    // SAFETY: restores the settings read above.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    read.map_err(PassphraseError::Read)?;
    while line.ends_with('\n') || line.ends_with('\r') {
        line.pop();
    }
    Ok(line)
}
