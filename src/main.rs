//! The `envgate` command: parse flags, load and validate the configuration, then run or check.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use envgate::cli::{Cli, Command, ExplainArgs, HealthcheckArgs};
use envgate::config::{Config, LogFormat};
use envgate::output::emit;
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
    // Nor do these: they ask a running envgate, or print what the command line's definition makes.
    match &cli.command {
        Some(Command::Healthcheck(args)) => return healthcheck(args),
        Some(Command::Completions { shell }) => {
            let mut script = Vec::new();
            envgate::cli::completions(*shell, &mut script);
            emit(script);
            return ExitCode::SUCCESS;
        }
        Some(Command::Man { dir }) => {
            let written = match dir {
                Some(d) => envgate::cli::man_pages(d),
                None => {
                    let mut page = Vec::new();
                    envgate::cli::man(&mut page).map(|()| emit(page))
                }
            };
            return match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("envgate: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
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
            emit(format!("# envgate: configuration is valid; effective settings:\n{}", config.effective()));
            ExitCode::SUCCESS
        }
        Some(Command::Explain(args)) => explain(&config, &args),
        Some(Command::Audit(_) | Command::Healthcheck(_) | Command::Completions { .. } | Command::Man { .. }) => {
            unreachable!("handled before the configuration is loaded")
        }
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

/// `envgate explain`: exit 0 with the verdicts (or a kernel start envgate would forward), 1 when
/// the kernel start would be refused, 2 on a usage problem or when the kernelspecs cannot be had.
fn explain(config: &Config, args: &ExplainArgs) -> ExitCode {
    let pairs: Vec<(&str, &str)> = args.names.iter().filter_map(|n| n.split_once('=')).collect();
    let request = args.body.is_some() || !pairs.is_empty();
    if request && (pairs.len() != args.names.len() || (args.body.is_some() && !args.names.is_empty())) {
        eprintln!("envgate: explain takes NAMEs, or NAME=VALUE pairs, or --body: one of them");
        return ExitCode::from(2);
    }
    let body = match &args.body {
        Some(path) if path.as_os_str() == "-" => {
            let mut b = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                .map(|_| b)
                .map_err(|e| format!("cannot read standard input: {e}"))
        }
        Some(path) => std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display())),
        None => Ok(envgate::explain::body_of(args.kernelspec.as_deref(), &pairs)),
    };
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            eprintln!("envgate: {e}");
            return ExitCode::from(2);
        }
    };
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
            return ExitCode::from(2);
        }
    };
    let groups: Vec<String> = args.groups.iter().map(|g| g.trim().to_string()).filter(|g| !g.is_empty()).collect();
    if !request {
        let who = envgate::explain::Asking { user: args.user.as_deref(), groups: &groups };
        let e = envgate::explain::explain_for(&config.policy, &index, args.kernelspec.as_deref(), who, &args.names);
        if args.format == Format::Json {
            emit(format!("{}\n", serde_json::to_string_pretty(&e).expect("serializing an explanation")));
        } else {
            emit(e.to_text());
        }
        return ExitCode::SUCCESS;
    }
    // A whole kernel start: the proxy's own steps, for the identity the proxy would see.
    if config.identity.is_none() && (args.user.is_some() || !groups.is_empty()) {
        eprintln!(
            "envgate: note: no identity is configured, so the proxy applies no [users]/[groups] block: \
             --user and --groups are ignored for a kernel start"
        );
    }
    let who = envgate::explain::sender(config, args.user.as_deref(), &groups);
    // The verdicts on the body's names, as the dry run decides them.
    let names: Vec<String> = envgate::rewrite::start::parse(&body)
        .map(|b| b.env.iter().map(|(k, _)| k.to_string()).collect())
        .unwrap_or_default();
    let kernelspec = envgate::rewrite::start::parse(&body).ok().and_then(|b| b.name.map(|n| n.to_string()));
    let (user, groups) = match &who {
        Ok(Some(w)) => (Some(w.user.as_str()), w.groups.as_slice()),
        _ => (None, &[][..]),
    };
    let asking = envgate::explain::Asking { user, groups };
    let mut e = envgate::explain::explain_for(&config.policy, &index, kernelspec.as_deref(), asking, &names);
    let dry = envgate::explain::dry_run(config, index.clone(), &body, who);
    e.adopt(&dry);
    if args.format == Format::Json {
        let both = serde_json::json!({"explanation": e, "request": dry});
        emit(format!("{}\n", serde_json::to_string_pretty(&both).expect("serializing an explanation")));
    } else {
        emit(format!("{}{}", e.to_text(), dry.to_text()));
    }
    if dry.forwarded_body.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `envgate healthcheck`: exit 0 when the admin listener says ready, 1 otherwise (unreachable,
/// not ready, or no admin address to be had), with one line on stderr either way.
fn healthcheck(args: &HealthcheckArgs) -> ExitCode {
    let env = std::env::var("ENVGATE_ADMIN_LISTEN").ok().filter(|s| !s.is_empty());
    // The file only when neither --admin nor the variable (which wins over the file) says.
    let file = match &args.config {
        Some(path) if args.admin.is_none() && env.is_none() => envgate::healthcheck::admin_listen_in_file(path),
        _ => Ok(None),
    };
    let url = file.and_then(|f| envgate::healthcheck::admin_url(args.admin.as_deref(), env.as_deref(), f.as_deref()));
    let result = url.and_then(|url| match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(envgate::healthcheck::check(&url, args.timeout)),
        Err(e) => Err(format!("cannot start the runtime: {e}")),
    });
    match result {
        Ok(line) => {
            eprintln!("envgate: ready: {line}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("envgate: not ready: {why}");
            ExitCode::FAILURE
        }
    }
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
