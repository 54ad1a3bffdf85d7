//! The management interface's vocabulary, below every subsystem: QMP's
//! error classes, a command's failure ([`QmpError`]), its arguments
//! ([`Args`]) and answer ([`Done`]), and the entry a subsystem puts in the
//! command table ([`CommandDef`]).
//!
//! Subsystems write typed handlers, `fn(&S, TheirArgs) -> Result<R, QmpError>`
//! with `R` one of `()` (answers `{}`), a JSON value or [`Done`], and list
//! them in a table with [`command!`](crate::command); the monitor (`qmp/`)
//! dispatches over the tables concatenated and answers `query-commands`
//! from them.

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

/// QEMU's error classes (qapi/error.json).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
    DeviceNotActive,
}

impl ErrorClass {
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
        }
    }
}

/// A command's failure, as the client sees it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError::new(ErrorClass::GenericError, desc)
    }

    pub fn not_found(desc: impl Into<String>) -> Self {
        QmpError::new(ErrorClass::DeviceNotFound, desc)
    }

    pub fn not_active(desc: impl Into<String>) -> Self {
        QmpError::new(ErrorClass::DeviceNotActive, desc)
    }

    pub fn command_not_found(name: &str) -> Self {
        QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }

    /// A GenericError whose text is `e` and its sources, joined by ": ".
    pub fn chain(e: &dyn std::error::Error) -> Self {
        let mut s = e.to_string();
        let mut src = e.source();
        while let Some(c) = src {
            s.push_str(&format!(": {c}"));
            src = c.source();
        }
        QmpError::generic(s)
    }
}

/// A command's arguments, as the client sent them.
#[derive(Clone, Copy)]
pub struct Args<'a> {
    command: &'a str,
    arguments: &'a Map<String, Value>,
}

impl<'a> Args<'a> {
    pub fn new(command: &'a str, arguments: &'a Map<String, Value>) -> Self {
        Args { command, arguments }
    }

    /// The command's name.
    pub fn command(&self) -> &'a str {
        self.command
    }

    pub fn map(&self) -> &'a Map<String, Value> {
        self.arguments
    }

    pub fn to_value(&self) -> Value {
        Value::Object(self.arguments.clone())
    }

    /// The arguments as `T` (unknown members are errors where `T` denies
    /// them), with the parameter at fault in the error.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, QmpError> {
        serde_path_to_error::deserialize(self.to_value()).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path.is_empty() || path == "." {
                QmpError::generic(format!("Invalid arguments for '{}': {inner}", self.command))
            } else {
                QmpError::generic(format!(
                    "Invalid arguments for '{}': parameter '{path}': {inner}",
                    self.command
                ))
            }
        })
    }

    /// As [`Args::parse`], but the error names no parameter, as a
    /// transaction action's does (`Invalid arguments for 'x': {serde's text}`).
    pub fn parse_flat<T: DeserializeOwned>(&self) -> Result<T, QmpError> {
        serde_json::from_value(self.to_value()).map_err(|e| {
            QmpError::generic(format!("Invalid arguments for '{}': {e}", self.command))
        })
    }

    /// For a command that takes no arguments.
    pub fn none(&self) -> Result<NoArgs, QmpError> {
        match self.arguments.keys().next() {
            None => Ok(NoArgs),
            Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        }
    }
}

/// The argument "struct" of a command that takes none.
pub struct NoArgs;

/// What a command answers.
#[derive(Debug, PartialEq)]
pub struct Done {
    pub value: Value,
    /// Shut the daemon down once the reply is sent.
    pub quit: bool,
}

impl From<Value> for Done {
    fn from(value: Value) -> Done {
        Done { value, quit: false }
    }
}

impl From<()> for Done {
    fn from((): ()) -> Done {
        Done::from(json!({}))
    }
}

/// How a handler is called: on the subsystem's state `S`, with the
/// command's arguments.
pub type Handler<S> = fn(&S, Args<'_>) -> Result<Done, QmpError>;

/// One command of a table.
pub struct CommandDef<S: 'static> {
    pub name: &'static str,
    pub run: Handler<S>,
    /// Listed by query-commands (debug-only commands are not).
    pub listed: bool,
}

/// A [`CommandDef`] for a typed handler:
///
/// - `command!("name", handler)`: `handler(&S, A) -> Result<R, QmpError>`
///   where `A: Deserialize` is parsed from the arguments by [`Args::parse`];
/// - `command!("name", handler, flat)`: as the first, parsed by
///   [`Args::parse_flat`];
/// - `command!("name", handler, no_args)`: `handler(&S) -> Result<R, QmpError>`,
///   any argument is refused;
/// - `command!("name", handler, raw)`: `handler(&S, Args) -> Result<R, QmpError>`
///   parses the arguments itself;
///
/// with `R: Into<Done>`: `()`, a `serde_json::Value`, or [`Done`].
#[macro_export]
macro_rules! command {
    ($name:literal, $handler:path) => {
        $crate::qapi::CommandDef {
            name: $name,
            run: |s, a| $handler(s, a.parse()?).map(Into::into),
            listed: true,
        }
    };
    ($name:literal, $handler:path, flat) => {
        $crate::qapi::CommandDef {
            name: $name,
            run: |s, a| $handler(s, a.parse_flat()?).map(Into::into),
            listed: true,
        }
    };
    ($name:literal, $handler:path, no_args) => {
        $crate::qapi::CommandDef {
            name: $name,
            run: |s, a| {
                a.none()?;
                $handler(s).map(Into::into)
            },
            listed: true,
        }
    };
    ($name:literal, $handler:path, raw) => {
        $crate::qapi::CommandDef {
            name: $name,
            run: |s, a| $handler(s, a).map(Into::into),
            listed: true,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[serde(rename_all = "kebab-case", deny_unknown_fields)]
    struct A {
        node_name: String,
        size: Option<u64>,
    }

    fn add(_: &u64, a: A) -> Result<Value, QmpError> {
        Ok(json!({"n": a.node_name, "s": a.size}))
    }

    fn quit(_: &u64) -> Result<Done, QmpError> {
        Ok(Done {
            value: json!({}),
            quit: true,
        })
    }

    static TABLE: &[CommandDef<u64>] = &[command!("x-add", add), command!("quit", quit, no_args)];

    fn call(name: &str, args: Value) -> Result<Done, QmpError> {
        let Value::Object(m) = args else {
            unreachable!("tests pass objects")
        };
        let def = TABLE.iter().find(|d| d.name == name).expect("in the table");
        (def.run)(&0, Args::new(name, &m))
    }

    #[test]
    fn typed_handlers_get_their_arguments_or_qemus_errors() {
        let d = call("x-add", json!({"node-name": "a", "size": 3})).unwrap();
        assert_eq!(d.value, json!({"n": "a", "s": 3}));
        assert!(!d.quit);
        let e = call("x-add", json!({"size": "x", "node-name": "a"})).unwrap_err();
        assert_eq!(e.class, ErrorClass::GenericError);
        assert!(
            e.desc
                .starts_with("Invalid arguments for 'x-add': parameter 'size': "),
            "{}",
            e.desc
        );
        let e = call("x-add", json!({})).unwrap_err();
        assert_eq!(
            e.desc,
            "Invalid arguments for 'x-add': missing field `node-name`"
        );
        assert!(call("quit", json!({})).unwrap().quit);
        let e = call("quit", json!({"now": true})).unwrap_err();
        assert_eq!(e.desc, "Parameter 'now' is unexpected");
    }

    #[test]
    fn error_chains_join_their_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = QmpError::chain(&Outer(std::io::Error::other("inner")));
        assert_eq!(e, QmpError::generic("outer: inner"));
        assert_eq!(e.to_string(), "outer: inner");
    }
}
