//! Error policies: what a failed request does, for exports (QEMU's
//! rerror/werror) and block jobs (on-source-error, on-target-error, ...)
//! alike.

use serde::{de, Deserialize, Deserializer};

/// qapi BlockdevOnError: the policy for a failed request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// The error goes to whoever asked (the guest, the job).
    #[default]
    Report,
    /// Whoever asked is told the request succeeded.
    Ignore,
    /// Stop on ENOSPC, report anything else.
    Enospc,
    /// Stop (the export's queues until `cont`, the job until resumed)
    /// and retry the request then.
    Stop,
    /// Jobs only: what the job's nodes' own policy says (report here).
    Auto,
}

/// What became of one failed request (qapi BlockErrorAction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    Report,
    Ignore,
    Stop,
}

impl ErrorAction {
    pub fn name(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

impl OnError {
    pub fn name(self) -> &'static str {
        match self {
            OnError::Report => "report",
            OnError::Ignore => "ignore",
            OnError::Enospc => "enospc",
            OnError::Stop => "stop",
            OnError::Auto => "auto",
        }
    }

    /// The action for a failure (`nospace`: it failed with ENOSPC).
    pub fn action(self, nospace: bool) -> ErrorAction {
        match self {
            OnError::Report | OnError::Auto => ErrorAction::Report,
            OnError::Ignore => ErrorAction::Ignore,
            OnError::Enospc if nospace => ErrorAction::Stop,
            OnError::Enospc => ErrorAction::Report,
            OnError::Stop => ErrorAction::Stop,
        }
    }
}

/// An export's policy (on-read-error, on-write-error): a BlockdevOnError
/// but `auto`, which only jobs take (QEMU refuses it for rerror/werror).
pub fn export_policy<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OnError>, D::Error> {
    match Option::<OnError>::deserialize(d)? {
        Some(OnError::Auto) => Err(de::Error::unknown_variant(
            "auto",
            &["report", "ignore", "enospc", "stop"],
        )),
        o => Ok(o),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_stops_on_a_full_disk_only() {
        assert_eq!(OnError::Enospc.action(true), ErrorAction::Stop);
        assert_eq!(OnError::Enospc.action(false), ErrorAction::Report);
        assert_eq!(OnError::Auto.action(true), ErrorAction::Report);
        assert_eq!(OnError::Ignore.action(false), ErrorAction::Ignore);
        assert_eq!(OnError::Stop.action(false), ErrorAction::Stop);
    }

    #[derive(Deserialize)]
    struct Export {
        #[serde(default, deserialize_with = "export_policy")]
        p: Option<OnError>,
    }

    #[test]
    fn exports_refuse_auto_in_the_words_of_the_enum_they_had() {
        let e = serde_json::from_value::<Export>(serde_json::json!({"p": "auto"}))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("unknown variant `auto`, expected one of `report`, `ignore`, `enospc`, `stop`")
        );
        let ok = |v| serde_json::from_value::<Export>(v).map(|e| e.p).ok();
        assert_eq!(
            ok(serde_json::json!({"p": "enospc"})),
            Some(Some(OnError::Enospc))
        );
        assert_eq!(ok(serde_json::json!({})), Some(None));
    }
}
