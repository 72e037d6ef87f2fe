//! The `envgate` command: parse flags, load and validate the configuration, then run or check.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use envgate::cli::{Cli, Command, ExplainArgs};
use envgate::config::{Config, LogFormat};
use envgate::summary::Format;
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: its per-thread free lists suit envgate's per-core workers
/// and short-lived request allocations. In the benchmark it cut the CPU of a kernel start by a
/// tenth or more, for about 0.7 MiB more RSS at start. Built with `no_thp`: transparent huge pages
/// made each thread's first heap page a 2 MiB one (15 MiB RSS at start instead of 8.7).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::parse_from(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => {
            // clap's whole message: what is wrong, the possible values, a "did you mean", the usage.
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    // `audit` reads a log, not the proxy's settings: it must work wherever the log was copied to, even
    // where envgate's configuration is absent or unreadable.
    if let Some(Command::Audit(cmd)) = &cli.command {
        return envgate::summary::run(cmd);
    }
    let opts = cli.opts().clone();
    let config = match Config::load(&opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("envgate: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Check(_)) => {
            // Load what start-up would load (certificates, keys), so that check catches it too.
            if let Err(e) = envgate::server::preflight(&config) {
                eprintln!("envgate: {e}");
                return ExitCode::from(2);
            }
            // What start-up would warn about, on stderr: the output stays a config file.
            for w in config.warnings() {
                eprintln!("envgate: warning: {w}");
            }
            println!("# envgate: configuration is valid; effective settings:");
            print!("{}", config.effective());
            ExitCode::SUCCESS
        }
        Some(Command::Explain(args)) => explain(&config, &args),
        Some(Command::Audit(_)) => unreachable!("handled before the configuration is loaded"),
        Some(Command::Run(_)) | None => {
            init_tracing(config.log_format);
            match envgate::limits::raise_fd_limit() {
                Ok(Some((old, new))) => tracing::info!(old, new, "raised the open-file limit (RLIMIT_NOFILE)"),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)"),
            }
            // The main thread accepts, handles signals and the admin listener; connections are
            // served (and their audit records written) by the worker threads `server::run` starts.
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("envgate: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(envgate::server::run(opts, config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "envgate failed");
                    eprintln!("envgate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `envgate explain`: exit 0 with the verdicts, 2 on a usage problem, 1 when the kernelspecs cannot be had.
fn explain(config: &Config, args: &ExplainArgs) -> ExitCode {
    let index = match &args.kernelspecs_file {
        Some(path) => envgate::explain::index_from_file(path).map(std::sync::Arc::new),
        None => match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(envgate::explain::index_from_upstream(config, args.token.as_deref())),
            Err(e) => Err(format!("cannot start the runtime: {e}")),
        },
    };
    let index = match index {
        Ok(i) => i,
        Err(e) => {
            eprintln!("envgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let groups: Vec<String> = args.groups.iter().map(|g| g.trim().to_string()).filter(|g| !g.is_empty()).collect();
    let who = envgate::explain::Asking { user: args.user.as_deref(), groups: &groups };
    let e = envgate::explain::explain_for(&config.policy, &index, args.kernelspec.as_deref(), who, &args.names);
    if args.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&e).expect("serializing an explanation"));
    } else {
        print!("{}", e.to_text());
    }
    ExitCode::SUCCESS
}

/// Diagnostics on stderr: colour only for a terminal, and never with `NO_COLOR` set (to anything
/// but empty); the time as the audit record's `timestamp` has it (RFC 3339, UTC, milliseconds;
/// tracing's JSON lines name it `timestamp` too), so that one shipper rule reads both logs.
fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = colour(std::io::stderr().is_terminal(), std::env::var_os("NO_COLOR").as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_timer(envgate::audit::Rfc3339Millis);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Whether the text diagnostics may hold colour codes (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && !matches!(no_color, Some(v) if !v.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(super::colour(true, None));
        assert!(super::colour(true, Some(OsStr::new(""))));
        assert!(!super::colour(true, Some(OsStr::new("1"))));
        assert!(!super::colour(false, None));
        assert!(!super::colour(false, Some(OsStr::new(""))));
    }
}
