//! The command line: `envgate [run | check | explain | audit | healthcheck | completions | man]`.
//! The proxy's flags are the settings table's ([`Opts`]); `run`, `check`, `explain` and `envgate`
//! alone take them; `audit` reads a log, `healthcheck` asks a running envgate, and `completions`
//! and `man` print what is generated from this definition: they take none.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::config::Opts;
use crate::summary::{AuditCommand, Format};

/// envgate: an env-policy proxy in front of Jupyter Enterprise Gateway.
#[derive(Debug, Parser)]
#[command(name = "envgate", version, about, long_about = None, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The settings of `envgate` without a subcommand (which is `envgate run`).
    #[command(flatten)]
    pub opts: Opts,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (the default).
    Run(Opts),
    /// Validate the configuration and print the effective policy; exit 2 when it is invalid.
    Check(Opts),
    /// Say, for each variable name, whether the policy keeps it for a kernelspec and which
    /// source or rule decided; given NAME=VALUE pairs or a whole body (--body), what envgate would
    /// forward, refuse and audit for that kernel start. Uses the same code as the proxy. Exit 0,
    /// or 1 when the kernel start would be refused; 2 on a usage problem or when the kernelspecs
    /// cannot be had.
    Explain(ExplainArgs),
    /// Read an audit log: `envgate audit summarize PATH` counts, per kernelspec and per user,
    /// which names were rejected (and why) and kept. Needs no configuration.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Ask a running envgate's admin listener whether it is ready (GET /readyz): exit 0 when it
    /// is, 1 when not or unreachable, with one line on stderr. For container health checks.
    Healthcheck(HealthcheckArgs),
    /// Print a shell completion script for envgate to stdout.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print envgate's man page (roff) to stdout: `envgate man > envgate.1`; with --dir, write it
    /// and one page per subcommand (envgate-explain.1, envgate-audit-summarize.1, ...) there.
    Man {
        /// Write every page into this directory instead of printing the main one.
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

/// `envgate healthcheck [--admin URL] [--config FILE] [--timeout DURATION]`
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The admin listener's URL [default: from admin_listen as ENVGATE_ADMIN_LISTEN or the
    /// config file sets it, else http://127.0.0.1:9464].
    #[arg(long, value_name = "URL")]
    pub admin: Option<String>,
    /// The config file to read admin_listen from (only that key is read).
    #[arg(long, env = "ENVGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How long to wait for the answer (the readiness probe itself gives the upstream 2s).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

/// `envgate explain [--kernelspec NAME] [--user U] [--groups G1,G2] [--kernelspecs-file F] NAME[=VALUE]...`
/// or `envgate explain [--user U] [--groups G1,G2] --body FILE|-`
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The kernelspec to decide for [default: the upstream's default kernelspec].
    #[arg(long)]
    pub kernelspec: Option<String>,
    /// Read the kernelspecs from this file (the body of GET /api/kernelspecs) instead of
    /// fetching them from the upstream.
    #[arg(long, value_name = "FILE")]
    pub kernelspecs_file: Option<PathBuf>,
    /// Decide for this user (their [users.NAME] block, and the user in set_envs templates). With
    /// identity configured, the user the trusted header (or the token) names.
    #[arg(long = "user", id = "explain_user", value_name = "USER")]
    pub user: Option<String>,
    /// Decide for a member of these groups, comma-separated (their [groups.NAME] blocks).
    #[arg(long = "groups", id = "explain_groups", value_name = "GROUPS", value_delimiter = ',')]
    pub groups: Vec<String>,
    /// EG's auth token, sent as `Authorization: token ...` when fetching kernelspecs.
    #[arg(long, env = "ENVGATE_EXPLAIN_TOKEN", value_name = "TOKEN")]
    pub token: Option<String>,
    /// Output.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// A kernel start's whole body (`-`: standard input), as a client would send it: say what
    /// envgate would forward, refuse and audit.
    #[arg(long, value_name = "FILE|-", conflicts_with = "kernelspec")]
    pub body: Option<PathBuf>,
    /// Variable names to explain; NAME=VALUE pairs: the kernel start whose env holds them.
    #[arg(required_unless_present = "body", value_name = "NAME[=VALUE]")]
    pub names: Vec<String>,
    #[command(flatten)]
    pub opts: Opts,
}

/// The command line when it starts with a subcommand: without the top level's proxy flags.
#[derive(Debug, Parser)]
#[command(name = "envgate", version, about, long_about = None)]
struct WithSubcommand {
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// Parses `args` (the program's name first). A subcommand can only come first (flags before
    /// it are refused); a command line that starts with one is parsed without the top level's
    /// proxy flags, so that clap neither reads nor checks their `ENVGATE_*` variables for it:
    /// `audit` must work whatever the environment holds.
    pub fn parse_from(args: impl IntoIterator<Item = OsString>) -> Result<Cli, clap::Error> {
        let args: Vec<OsString> = args.into_iter().collect();
        let first = args.get(1).and_then(|a| a.to_str());
        if first.is_some_and(|a| WithSubcommand::command().find_subcommand(a).is_some()) {
            let w = WithSubcommand::try_parse_from(args)?;
            return Ok(Cli { command: Some(w.command), opts: Opts::default() });
        }
        Cli::try_parse_from(args)
    }

    /// The proxy settings this command line gives (for `audit`, which takes none, the empty ones).
    pub fn opts(&self) -> &Opts {
        match &self.command {
            Some(Command::Run(o) | Command::Check(o)) => o,
            Some(Command::Explain(a)) => &a.opts,
            None
            | Some(Command::Audit(_) | Command::Healthcheck(_) | Command::Completions { .. } | Command::Man { .. }) => {
                &self.opts
            }
        }
    }
}

/// Writes the completion script for `shell`, generated from the command line's definition.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), "envgate", out);
}

/// Writes envgate's man page (section 1, roff), generated from the command line's definition.
pub fn man(out: &mut dyn std::io::Write) -> std::io::Result<()> {
    clap_mangen::Man::new(Cli::command()).render(out)
}

/// Writes envgate's man pages into `dir`: `envgate.1` and one per subcommand, which the main
/// page refers to (`envgate-explain.1`, `envgate-audit-summarize.1`, ...).
pub fn man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    clap_mangen::generate_to(Cli::command(), dir)
}
