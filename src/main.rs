//! `vhost-user-blkd`: parse, validate, run.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use vhost_user_blkd::config::{Args, Config};
use vhost_user_blkd::shell;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("create") {
        return match vhost_user_blkd::create::run(&argv[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vhost-user-blkd create: {e}");
                ExitCode::from(1)
            }
        };
    }
    if argv.get(1).map(String::as_str) == Some("help") {
        return help(argv.get(2).map(String::as_str));
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // --help and --version print and succeed; usage errors exit 1.
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if args.print_capabilities {
        // QEMU's backend program conventions (docs/interop/vhost-user.rst):
        // a VHostUserBackendCapabilities object of docs/interop/vhost-user.json.
        print!("{}", vhost_user_blkd::config::CAPABILITIES);
        return ExitCode::SUCCESS;
    }
    let config = match Config::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vhost-user-blkd: {e}");
            return ExitCode::from(1);
        }
    };
    match shell::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("vhost-user-blkd: {msg}");
            ExitCode::from(1)
        }
    }
}

/// `vhost-user-blkd help [create]`: the long help of the daemon or of
/// `create`.
fn help(topic: Option<&str>) -> ExitCode {
    match topic {
        None => {
            let _ = Args::command().print_long_help();
            ExitCode::SUCCESS
        }
        Some("create") => match vhost_user_blkd::create::run(&["--help".to_string()]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vhost-user-blkd create: {e}");
                ExitCode::from(1)
            }
        },
        Some(t) => {
            eprintln!("vhost-user-blkd help: no help on '{t}' (topics: create)");
            ExitCode::from(1)
        }
    }
}
