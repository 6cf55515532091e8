// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkbackd`: a per-guest userspace block backend.
//!
//! `main` parses the command line, sets up logging and signal handling, and hands over to the subcommand's
//! module. A usage error (a missing or invalid argument) prints clap's whole message (what is missing, the valid
//! values, the usage line) and exits with code 2; any setup error after that ends the process with one line on
//! stderr (`blkbackd: error: ...`) and exit code 1.

mod cli;
mod coexist;
mod control;
#[cfg(feature = "demo")]
mod demo;
mod logging;
mod metrics_http;
mod notify;
mod owned_path;
mod sandbox;
mod signals;
mod vhost_user;
mod xen;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    // The vhost-user backend conventions: answer whatever else the command line holds.
    if vhost_user::capabilities_requested(std::env::args_os()) {
        print!("{}", vhost_user::capabilities_json());
        return ExitCode::SUCCESS;
    }
    // Help and version: stdout, exit 0. Usage errors: clap's own message on stderr, exit 2.
    let cli = Cli::try_parse().unwrap_or_else(|e| e.exit());
    if let Command::VhostUser(args) = &cli.command {
        if let Err(e) = args.check_socket() {
            e.exit()
        }
    }
    logging::init(cli.log_format);
    let shutdown = match signals::Shutdown::install() {
        Ok(shutdown) => shutdown,
        Err(e) => return fail(format!("cannot set up signal handling: {e}")),
    };
    // The serving subcommands start the signal thread themselves, once they have dropped their privileges.
    if !matches!(cli.command, Command::VhostUser(_) | Command::Xen(_) | Command::XenWorker(_)) {
        if let Err(e) = shutdown.listen() {
            return fail(format!("cannot set up signal handling: {e}"));
        }
    }
    let result = match cli.command {
        Command::VhostUser(args) => vhost_user::run(&args, &shutdown),
        Command::Xen(args) => xen::run(&args, &shutdown, cli.log_format),
        Command::XenWorker(args) => xen::run_worker(&args, &shutdown),
        Command::Stats(args) => control::query(&args.control, args.prometheus).map(|report| print!("{report}")),
        Command::Resize(args) => control::resize(&args.control).map(|report| print!("{report}")),
        Command::Man { dir } => man_pages(&dir),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(args.seccomp),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The error and its causes, `: `-separated; each says its cause once (in its message or as its source).
        Err(e) => fail(format!("{e:#}")),
    }
}

/// The man pages, generated from the command line's own definition: `blkbackd.1` and one per subcommand.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let top = Cli::command();
    let mut pages = vec![("blkbackd".to_string(), top.clone())];
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("blkbackd-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, command) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        clap_mangen::Man::new(command).render(&mut file).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Report a setup error on one line and return the failure exit code.
fn fail(message: String) -> ExitCode {
    let one_line = message.replace('\n', " ");
    eprintln!("blkbackd: error: {one_line}");
    ExitCode::from(1)
}
