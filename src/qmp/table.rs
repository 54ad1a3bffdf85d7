//! The command table: the subsystems' tables concatenated, dispatch over
//! it, and the monitor's own commands (capabilities, version, the command
//! list, quit). `query-commands` is generated from the table, so a command
//! is listed exactly when it can be run.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::protocol::Command;
use crate::qapi::{Args, CommandDef, Done, ErrorClass, QmpError};
use crate::state::State;

/// A command of this daemon: a handler on the daemon's state.
pub type Def = CommandDef<Arc<State>>;

pub const PACKAGE: &str = concat!("vhost-user-blkd ", env!("CARGO_PKG_VERSION"));

/// Our version, in QEMU's major/minor/micro shape.
pub fn version() -> (u64, u64, u64) {
    let parse = |s: &str| s.parse().unwrap_or(0);
    (
        parse(env!("CARGO_PKG_VERSION_MAJOR")),
        parse(env!("CARGO_PKG_VERSION_MINOR")),
        parse(env!("CARGO_PKG_VERSION_PATCH")),
    )
}

/// The monitor's own commands.
static CORE: &[Def] = &[
    crate::command!("qmp_capabilities", already_negotiated, raw),
    crate::command!("query-version", query_version, no_args),
    crate::command!("query-commands", query_commands, no_args),
    crate::command!("quit", quit, no_args),
];

/// Debug builds only, for tests: a command that panics, as a bug would,
/// holding the management locks. Not listed.
#[cfg(debug_assertions)]
static DEBUG: &[Def] = &[Def {
    name: "x-debug-panic",
    run: |s, _| s.debug_panic(),
    listed: false,
}];
#[cfg(not(debug_assertions))]
static DEBUG: &[Def] = &[];

/// Every table, in the order query-commands lists them.
fn tables() -> [&'static [Def]; 9] {
    [
        CORE,
        super::nodes::COMMANDS,
        crate::state::qmp::exports::COMMANDS,
        crate::snapshot::qmp::COMMANDS,
        crate::transaction::qmp::COMMANDS,
        crate::bitmaps::qmp::COMMANDS,
        crate::jobs::qmp::COMMANDS,
        crate::state::qmp::objects::COMMANDS,
        DEBUG,
    ]
}

pub fn commands() -> impl Iterator<Item = &'static Def> {
    tables().into_iter().flatten()
}

fn find(name: &str) -> Option<&'static Def> {
    commands().find(|d| d.name == name)
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Capabilities {
    #[serde(default)]
    enable: Vec<String>,
}

/// Runs `cmd`. Before capabilities negotiation only qmp_capabilities works.
pub fn dispatch(
    state: &Arc<State>,
    cmd: &Command,
    negotiated: &mut bool,
) -> Result<Done, QmpError> {
    let args = Args::new(&cmd.name, &cmd.arguments);
    if !*negotiated {
        if cmd.name != "qmp_capabilities" {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        let caps: Capabilities = args.parse()?;
        if let Some(c) = caps.enable.first() {
            return Err(QmpError::generic(format!(
                "Capability '{c}' is not available"
            )));
        }
        *negotiated = true;
        return Ok(Done::from(json!({})));
    }
    let _serialised = state.command_lock();
    let def = find(&cmd.name).ok_or_else(|| QmpError::command_not_found(&cmd.name))?;
    (def.run)(state, args)
}

fn already_negotiated(_: &Arc<State>, _: Args) -> Result<Done, QmpError> {
    Err(QmpError::new(
        ErrorClass::CommandNotFound,
        "Capabilities negotiation is already complete, command ignored",
    ))
}

fn query_version(_: &Arc<State>) -> Result<Value, QmpError> {
    let (major, minor, micro) = version();
    Ok(json!({"qemu": {"major": major, "minor": minor, "micro": micro}, "package": PACKAGE}))
}

fn query_commands(_: &Arc<State>) -> Result<Value, QmpError> {
    Ok(json!(commands()
        .filter(|d| d.listed)
        .map(|d| json!({"name": d.name}))
        .collect::<Vec<_>>()))
}

fn quit(_: &Arc<State>) -> Result<Done, QmpError> {
    Ok(Done {
        value: json!({}),
        quit: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The list the monitor had by hand before the table, in its order.
    const BEFORE: &[&str] = &[
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "quit",
        "blockdev-add",
        "blockdev-del",
        "query-named-block-nodes",
        "x-debug-query-block-graph",
        "block-export-add",
        "block-export-del",
        "query-block-exports",
        "x-block-export-set-writethrough",
        "block_resize",
        "blockdev-snapshot",
        "blockdev-snapshot-sync",
        "transaction",
        "change-backing-file",
        "block-dirty-bitmap-add",
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
        "block-dirty-bitmap-merge",
        "x-debug-block-dirty-bitmap-sha256",
        "blockdev-snapshot-internal-sync",
        "blockdev-snapshot-delete-internal-sync",
        "x-blockdev-snapshot-goto-internal",
        "query-blockstats",
        "block-latency-histogram-set",
        "block-set-write-threshold",
        "blockdev-set-active",
        "cont",
        "blockdev-reopen",
        "blockdev-create",
        "query-jobs",
        "query-block-jobs",
        "block-stream",
        "block-commit",
        "blockdev-mirror",
        "drive-mirror",
        "blockdev-backup",
        "block-job-set-speed",
        "block-job-pause",
        "block-job-resume",
        "block-job-cancel",
        "block-job-complete",
        "block-job-finalize",
        "block-job-dismiss",
        "job-pause",
        "job-resume",
        "job-cancel",
        "job-complete",
        "job-finalize",
        "job-dismiss",
        "object-add",
        "object-del",
        "qom-get",
        "qom-set",
        // issue 22: the NBD server.
        "nbd-server-start",
        "nbd-server-stop",
        "x-nbd-server-query",
        // issue 24.
        "drive-backup",
        // issue 24: quorum children at run time.
        "x-blockdev-change",
        // issue 24: moving exports between iothreads.
        "x-blockdev-set-iothread",
    ];

    #[test]
    fn the_listed_commands_are_the_ones_listed_by_hand_before() {
        let mut listed: Vec<&str> = commands().filter(|d| d.listed).map(|d| d.name).collect();
        let mut before = BEFORE.to_vec();
        listed.sort_unstable();
        before.sort_unstable();
        assert_eq!(listed, before);
    }

    #[test]
    fn every_command_is_in_the_table_once() {
        let mut names: Vec<&str> = commands().map(|d| d.name).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    #[test]
    fn the_panic_command_exists_in_debug_builds_only_and_is_never_listed() {
        let d = find("x-debug-panic");
        assert_eq!(d.is_some(), cfg!(debug_assertions));
        assert!(d.is_none_or(|d| !d.listed));
    }
}
