//! The configuration parsers: keyval strings (QEMU's `-blockdev` syntax),
//! the JSON form of the same options, the TOML configuration file, and the
//! whole command line's options validated into a Config.
//!
//! Input: the first byte chooses the parser, the rest is UTF-8 text.
//!
//! ```text
//!   0  keyval::parse, implied key from the second byte
//!   1  command-line options, one a line: "b <blockdev>", "e <export>",
//!      "o <object>", "c <chardev>", "m <monitor>", "r <run-with>",
//!      "M <socket-mode>", "G <socket-group>", "s <sandbox>",
//!      "u <allow-peer-uid>"; then Config::try_from
//!   2  a TOML configuration file (--config); then Config::try_from
//!   3  JSON blockdev, export and object options (what QMP gives)
//! ```
//!
//! Options that open or probe files (--image, --config of another path,
//! --allow-path checks) are not generated from the input.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vhost_user_blkd::config::export::{ExportOptions, VhostUserBlkOptions};
use vhost_user_blkd::config::{keyval, Args, Config, ExportConfig, ObjectOptions};
use vhost_user_blkd::drivers::BlockdevOptions;

fn config_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // scripts/fuzz.sh points TMPDIR at a scratch directory on tmpfs
        // that it removes.
        let dir = std::env::temp_dir().join(format!("vub-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("config directory");
        dir.join("vub.toml")
    })
}

const IMPLIED: [Option<&str>; 5] = [
    None,
    Some("qom-type"),
    Some("type"),
    Some("backend"),
    Some("chardev"),
];

fn command_line(text: &str) -> Args {
    let mut a = Args::default();
    for line in text.lines() {
        let mut chars = line.chars();
        let Some(kind) = chars.next() else { continue };
        let v = chars
            .as_str()
            .strip_prefix(' ')
            .unwrap_or(chars.as_str())
            .to_string();
        match kind {
            'b' => a.blockdev.push(v),
            'e' => a.export.push(v),
            'o' => a.object.push(v),
            'c' => a.chardev.push(v),
            'm' => a.monitor.push(v),
            'r' => a.run_with.push(v),
            'M' => a.socket_mode = Some(v),
            'G' => a.socket_group = Some(v),
            's' => a.sandbox = Some(v),
            'u' => a.allow_peer_uid.push(v),
            _ => {}
        }
    }
    a
}

fn validate(args: Args) {
    if let Ok(c) = Config::try_from(args) {
        // What start-up prints of a config.
        let _ = format!("{c:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match mode % 4 {
        0 => {
            let (implied, text) = match text.split_at_checked(1) {
                Some((k, t)) => (IMPLIED[usize::from(k.as_bytes()[0]) % IMPLIED.len()], t),
                None => (None, text),
            };
            if let Ok(v) = keyval::parse(text, implied) {
                let _ = serde_json::from_value::<BlockdevOptions>(v.clone());
                let _ = serde_json::from_value::<ExportOptions>(v.clone());
                let _ = serde_json::from_value::<ObjectOptions>(v);
            }
            let _ = keyval::split_pairs(text);
        }
        1 => validate(command_line(text)),
        2 => {
            std::fs::write(config_path(), text).expect("write the config file to tmpfs");
            validate(Args {
                config: Some(config_path().clone()),
                ..Args::default()
            });
        }
        _ => {
            let _ = serde_json::from_str::<BlockdevOptions>(text);
            let _ = serde_json::from_str::<ObjectOptions>(text);
            if let Ok(o) = serde_json::from_str::<VhostUserBlkOptions>(text) {
                let _ = ExportConfig::try_from(o);
            }
        }
    }
});
