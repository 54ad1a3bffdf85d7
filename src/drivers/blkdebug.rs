//! The `blkdebug` filter driver: QEMU's error injection (block/blkdebug.c),
//! with its options, its config file format and its rule semantics.
//!
//! ```text
//!   qcow2 --file--> blkdebug --image--> file
//!     |                ^ rules: event -> inject-error / set-state
//!     +- debug_event --+ (l2_load, cluster_alloc, flush_to_os, ...)
//! ```
//!
//! A format driver raises debug events on its `file` child
//! ([`Node::debug_event`], a no-op on every other driver). When an event
//! fires, each rule of that event whose `state` is 0 or the current state
//! acts: an `inject-error` rule becomes *active* (the first one of this
//! event clears the rules other events had made active), a `set-state`
//! rule sets the state the node moves to once all of the event's rules
//! ran. Every later request through this node (read, write, write-zeroes,
//! discard, flush; block-status with `iotype=block-status`) is checked
//! against the active rules, first activated first: the first whose
//! `sector` lies in the request (or that has none) and whose `iotype`
//! matches fails the request with its `errno`, and with `once=on` is
//! removed for good. A rule stays active (failing every matching request)
//! until it is removed or another event activates rules. `immediately=on`
//! fails the request at once; `off` (the default) first yields to the
//! iothread, as QEMU reschedules the coroutine: either way it is the
//! checked request that fails, never the one that raised the event.
//! The rules of event `none` are run once at open.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use futures::future::LocalBoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::BlockdevRef;
use crate::block::{
    BlockError, BlockFuture, BlockStatus, Child, ChildRole, DebugEvent, Graph, GraphError, Perm,
};
use crate::io::IoVecs;
use crate::opts;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlkdebugOptions {
    #[serde(default)]
    pub node_name: String,
    pub image: BlockdevRef,
    /// QEMU's blkdebug config file ([inject-error] / [set-state] groups).
    pub config: Option<String>,
    // Checked as QEMU checks them (sizes, parsed by hand for its words).
    pub align: Option<Value>,
    pub max_transfer: Option<Value>,
    pub opt_write_zero: Option<Value>,
    pub max_write_zero: Option<Value>,
    pub opt_discard: Option<Value>,
    pub max_discard: Option<Value>,
    /// Lists (JSON arrays, or keyval's `inject-error.0.event=...`).
    pub inject_error: Option<Value>,
    pub set_state: Option<Value>,
    pub take_child_perms: Option<Value>,
    pub unshare_child_perms: Option<Value>,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_only: bool,
    /// Common options (QEMU's BlockdevOptions base): see [`super::CommonOptions`].
    #[serde(default, deserialize_with = "opts::bool")]
    pub auto_read_only: bool,
    #[serde(default)]
    pub detect_zeroes: super::DetectZeroes,
    #[serde(default, deserialize_with = "opts::bool")]
    pub force_share: bool,
    /// QEMU 10's `active`: off opens the node inactive (no write lock,
    /// no write); absent means on, or inactive under an inactive parent.
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub active: Option<bool>,
    #[serde(default)]
    pub cache: super::CacheOptions,
    /// Anything else is refused with QEMU's words (not serde's).
    #[serde(flatten)]
    pub unknown: BTreeMap<String, Value>,
}

/// QEMU's BlkdebugIOType, as bits of a rule's mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    Read = 0,
    Write = 1,
    WriteZeroes = 2,
    Discard = 3,
    Flush = 4,
    BlockStatus = 5,
}

impl IoType {
    fn from_name(s: &str) -> Option<IoType> {
        Some(match s {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return None,
        })
    }

    fn op(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::WriteZeroes => "write-zeroes",
            IoType::Discard => "discard",
            IoType::Flush => "flush",
            IoType::BlockStatus => "block-status",
        }
    }
}

/// Every type but block-status (QEMU's default mask).
const DEFAULT_IOTYPES: u8 = 0b1_1111;

/// An inject-error rule's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inject {
    pub errno: i64,
    pub once: bool,
    pub immediately: bool,
    /// Byte offset (`sector` * 512); None for any request.
    pub offset: Option<u64>,
    pub iotypes: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Inject(Inject),
    SetState(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub event: DebugEvent,
    /// 0: in any state.
    pub state: i64,
    pub action: Action,
}

/// The rules and the state machine (QEMU's BDRVBlkdebugState).
struct Rules {
    state: i64,
    /// Per event, in QEMU's list order (the rule added last first), with
    /// an id so that an active rule can be found again.
    by_event: Vec<Vec<(u64, Rule)>>,
    /// Active inject-error rules, first to be checked first.
    active: Vec<(u64, DebugEvent, Inject)>,
}

impl Rules {
    fn new(rules: Vec<Rule>) -> Rules {
        let mut by_event = vec![Vec::new(); DebugEvent::ALL.len()];
        for (id, r) in (0u64..).zip(rules) {
            by_event[r.event as usize].insert(0, (id, r));
        }
        Rules {
            state: 1,
            by_event,
            active: Vec::new(),
        }
    }

    /// QEMU's blkdebug_debug_event and process_rule.
    fn event(&mut self, ev: DebugEvent) -> usize {
        let mut new_state = self.state;
        let mut injected = 0;
        for (id, r) in &self.by_event[ev as usize] {
            if r.state != 0 && r.state != self.state {
                continue;
            }
            match &r.action {
                Action::Inject(i) => {
                    if injected == 0 {
                        self.active.clear();
                    }
                    injected += 1;
                    self.active.insert(0, (*id, ev, i.clone()));
                }
                Action::SetState(s) => new_state = *s,
            }
        }
        self.state = new_state;
        injected
    }

    /// QEMU's rule_check: the errno to fail a request with, and whether
    /// at once; a `once` rule that fires is removed.
    fn check(&mut self, offset: u64, bytes: u64, t: IoType) -> Option<(i64, bool, DebugEvent)> {
        let pos = self.active.iter().position(|(_, _, i)| {
            let at = match i.offset {
                None => true,
                Some(o) => bytes != 0 && o >= offset && o - offset < bytes,
            };
            at && i.iotypes & (1 << t as u8) != 0
        })?;
        let (id, ev, inject) = self.active[pos].clone();
        if inject.errno == 0 {
            return None;
        }
        if inject.once {
            self.active.remove(pos);
            self.by_event[ev as usize].retain(|(rid, _)| *rid != id);
        }
        // A negative errno makes QEMU return a positive value, which its
        // callers take for success.
        (inject.errno > 0).then_some((inject.errno, inject.immediately, ev))
    }
}

pub struct BlkdebugDriver {
    name: String,
    file: Child,
    align: u32,
    rules: Mutex<Rules>,
}

/// Ready on its second poll: QEMU's aio_co_schedule + yield.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl BlkdebugDriver {
    pub fn open(o: &BlkdebugOptions, graph: &mut Graph) -> Result<Self, GraphError> {
        let fail = |reason: String| GraphError::Open {
            node: o.node_name.clone(),
            reason,
        };
        if let Some(k) = o.unknown.keys().next() {
            return Err(fail(format!("Parameter '{k}' is unexpected")));
        }
        // QAPI's checks of the whole structure come first in QEMU.
        let sizes = [
            ("align", &o.align),
            ("max-transfer", &o.max_transfer),
            ("opt-write-zero", &o.opt_write_zero),
            ("max-write-zero", &o.max_write_zero),
            ("opt-discard", &o.opt_discard),
            ("max-discard", &o.max_discard),
        ]
        .map(|(n, v)| parse_size_opt(n, v.as_ref()));
        let inline_inject =
            parse_list(o.inject_error.as_ref(), "inject-error", inline_inject).map_err(fail)?;
        let inline_set = parse_list(o.set_state.as_ref(), "set-state", inline_set).map_err(fail)?;
        let take = parse_perms(o.take_child_perms.as_ref(), "take-child-perms").map_err(fail)?;
        let unshare =
            parse_perms(o.unshare_child_perms.as_ref(), "unshare-child-perms").map_err(fail)?;
        let mut sz = [0u64; 6];
        for (i, s) in sizes.into_iter().enumerate() {
            sz[i] = s.map_err(fail)?;
        }
        let [align, max_transfer, opt_write_zero, max_write_zero, opt_discard, max_discard] = sz;
        // The config file's rules, then the inline ones; inject-error
        // rules before set-state rules (QEMU's read_config).
        let (mut inject, mut set) = match &o.config {
            Some(path) => {
                let text = std::fs::read(path).map_err(|e| {
                    fail(format!(
                        "Could not read blkdebug config file: {}",
                        crate::block::os_text(&e)
                    ))
                })?;
                parse_config(&String::from_utf8_lossy(&text)).map_err(fail)?
            }
            None => (Vec::new(), Vec::new()),
        };
        inject.extend(inline_inject);
        set.extend(inline_set);
        let mut rules = inject;
        rules.append(&mut set);
        for r in &rules {
            if let Some(why) = r.event.never_raised() {
                log::warn!(
                    "blkdebug node '{}': a rule on event '{}' can never fire: {why}",
                    o.node_name,
                    r.event.name()
                );
            }
        }

        let child = super::open_child(
            graph,
            &o.node_name,
            "image",
            &o.image,
            super::DiscardMode::Ignore,
        )?;
        let child_align = u64::from(child.request_alignment());
        // QEMU's blkdebug_open, in its order and words.
        if align != 0 && (align >= i32::MAX as u64 || !align.is_power_of_two()) {
            return Err(fail(format!("Cannot meet constraints with align {align}")));
        }
        let a = align.max(child_align).max(1);
        let check = |v: u64, what: &str, unit: u64| {
            if v != 0 && (v >= i32::MAX as u64 || v % unit.max(1) != 0) {
                return Err(fail(format!("Cannot meet constraints with {what} {v}")));
            }
            Ok(())
        };
        check(max_transfer, "max-transfer", a)?;
        check(opt_write_zero, "opt-write-zero", a)?;
        check(max_write_zero, "max-write-zero", opt_write_zero.max(a))?;
        check(opt_discard, "opt-discard", a)?;
        check(max_discard, "max-discard", opt_discard.max(a))?;

        let mut perm = Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
        if !o.read_only {
            perm = perm | Perm::WRITE;
        }
        let perm = perm | take;
        let shared = Perm::ALL & !unshare;
        let file = Child::attach(&o.node_name, ChildRole::Filtered, child, perm, shared)?;
        let d = BlkdebugDriver {
            name: o.node_name.clone(),
            file,
            align: a as u32,
            rules: Mutex::new(Rules::new(rules)),
        };
        d.event(DebugEvent::None);
        Ok(d)
    }

    pub fn file(&self) -> &Child {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.file.node().size()
    }

    pub fn request_alignment(&self) -> u32 {
        self.align
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rules> {
        // A panic while the lock was held left nothing half-changed that
        // matters more than going on.
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn event(&self, ev: DebugEvent) {
        let n = self.lock().event(ev);
        if n > 0 {
            log::debug!(
                "blkdebug node '{}': event '{}' made {n} rule(s) active",
                self.name,
                ev.name()
            );
        }
    }

    /// Fails the request if an active rule says so.
    async fn check(&self, offset: u64, len: u64, t: IoType) -> Result<(), BlockError> {
        let hit = self.lock().check(offset, len, t);
        let Some((errno, immediately, ev)) = hit else {
            return Ok(());
        };
        log::info!(
            "blkdebug node '{}': injecting errno {errno} into a {} at offset {offset} length {len} (rule of event '{}')",
            self.name,
            t.op(),
            ev.name()
        );
        if !immediately {
            YieldOnce(false).await;
        }
        Err(BlockError::Io {
            node: self.name.clone(),
            op: t.op(),
            offset,
            len,
            source: std::io::Error::from_raw_os_error(i32::try_from(errno).unwrap_or(libc::EIO)),
        })
    }

    pub fn preadv<'a>(&'a self, offset: u64, iov: &'a IoVecs) -> BlockFuture<'a> {
        BlockFuture::boxed(async move {
            self.check(offset, iov.len(), IoType::Read).await?;
            self.file.node().preadv(offset, iov).await
        })
    }

    pub fn pwritev<'a>(&'a self, offset: u64, iov: &'a IoVecs, fua: bool) -> BlockFuture<'a> {
        BlockFuture::boxed(async move {
            // QEMU's block layer raises these on the node written.
            self.event(DebugEvent::Pwritev);
            let r = match self.check(offset, iov.len(), IoType::Write).await {
                Ok(()) => self.file.node().pwritev(offset, iov, fua).await,
                Err(e) => Err(e),
            };
            self.event(DebugEvent::PwritevDone);
            r
        })
    }

    pub fn pwrite_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> BlockFuture<'_> {
        BlockFuture::boxed(async move {
            self.event(DebugEvent::PwritevZero);
            let r = match self.check(offset, len, IoType::WriteZeroes).await {
                Ok(()) => {
                    self.file
                        .node()
                        .pwrite_zeroes(offset, len, may_unmap, fua)
                        .await
                }
                Err(e) => Err(e),
            };
            self.event(DebugEvent::PwritevDone);
            r
        })
    }

    pub fn pdiscard(&self, offset: u64, len: u64) -> BlockFuture<'_> {
        BlockFuture::boxed(async move {
            self.check(offset, len, IoType::Discard).await?;
            self.file.node().pdiscard(offset, len).await
        })
    }

    pub fn flush(&self) -> BlockFuture<'_> {
        BlockFuture::boxed(async move {
            self.check(0, 0, IoType::Flush).await?;
            self.file.node().flush().await
        })
    }

    pub fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> LocalBoxFuture<'_, Result<BlockStatus, BlockError>> {
        Box::pin(async move {
            self.check(offset, len, IoType::BlockStatus).await?;
            self.file.node().block_status(offset, len).await
        })
    }
}

// ---- option parsing, in QEMU's words ----

/// A size option: QEMU converts the QAPI int to a QemuOpts size.
fn parse_size_opt(name: &str, v: Option<&Value>) -> Result<u64, String> {
    let bad = || format!("Parameter '{name}' expects a non-negative number below 2^64");
    match v {
        None => Ok(0),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(bad),
        Some(Value::String(s)) => opts::parse_size(s).ok_or_else(bad),
        Some(_) => Err(format!(
            "Invalid parameter type for '{name}', expected: integer"
        )),
    }
}

/// The items of a list option: a JSON array, or keyval's object with keys
/// 0, 1, ... (as QEMU's keyval makes a list of them).
fn list_items<'a>(v: &'a Value, name: &str) -> Result<Vec<&'a Value>, String> {
    match v {
        Value::Array(a) => Ok(a.iter().collect()),
        Value::Object(m) if m.keys().all(|k| k.parse::<usize>().is_ok()) => {
            let mut items: Vec<(usize, &Value)> =
                m.iter().map(|(k, v)| (k.parse().unwrap_or(0), v)).collect();
            items.sort_by_key(|(i, _)| *i);
            if items.iter().enumerate().any(|(i, (k, _))| i != *k) {
                return Err(format!("Parameter '{name}.{}' is missing", items.len()));
            }
            Ok(items.into_iter().map(|(_, v)| v).collect())
        }
        _ => Err(format!(
            "Invalid parameter type for '{name}', expected: array"
        )),
    }
}

fn parse_list(
    v: Option<&Value>,
    name: &str,
    item: fn(&Map<String, Value>, &str) -> Result<Rule, String>,
) -> Result<Vec<Rule>, String> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (i, it) in list_items(v, name)?.into_iter().enumerate() {
        let path = format!("{name}[{i}]");
        let Value::Object(m) = it else {
            return Err(format!(
                "Invalid parameter type for '{path}', expected: object"
            ));
        };
        out.push(item(m, &path)?);
    }
    Ok(out)
}

fn qapi_int(m: &Map<String, Value>, path: &str, key: &str) -> Result<Option<i64>, String> {
    let bad = || format!("Invalid parameter type for '{path}.{key}', expected: integer");
    match m.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(bad),
        // keyval (the command line) gives strings.
        Some(Value::String(s)) => parse_qemu_number(s).map(Some).ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

fn qapi_bool(m: &Map<String, Value>, path: &str, key: &str) -> Result<Option<bool>, String> {
    let bad = || format!("Invalid parameter type for '{path}.{key}', expected: boolean");
    match m.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) => opts::parse_bool(s).map(Some).ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

fn qapi_event(m: &Map<String, Value>, path: &str) -> Result<DebugEvent, String> {
    match m.get("event") {
        None => Err(format!("Parameter '{path}.event' is missing")),
        Some(Value::String(s)) => DebugEvent::from_name(s)
            .ok_or_else(|| format!("Parameter 'event' does not accept value '{s}'")),
        Some(_) => Err(format!(
            "Invalid parameter type for '{path}.event', expected: string"
        )),
    }
}

fn unexpected(m: &Map<String, Value>, path: &str, known: &[&str]) -> Result<(), String> {
    match m.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(format!("Parameter '{path}.{k}' is unexpected")),
        None => Ok(()),
    }
}

fn sector_offset(sector: i64) -> Option<u64> {
    // QEMU: -1 is "any"; another negative sector wraps to an offset no
    // request reaches.
    (sector != -1).then(|| sector.wrapping_mul(512) as u64)
}

fn inline_inject(m: &Map<String, Value>, path: &str) -> Result<Rule, String> {
    let known = [
        "event",
        "state",
        "iotype",
        "errno",
        "sector",
        "once",
        "immediately",
    ];
    unexpected(m, path, &known)?;
    let event = qapi_event(m, path)?;
    let state = qapi_int(m, path, "state")?.unwrap_or(0);
    let iotypes = match m.get("iotype") {
        None => DEFAULT_IOTYPES,
        Some(Value::String(s)) => {
            1 << IoType::from_name(s)
                .ok_or_else(|| format!("Parameter 'iotype' does not accept value '{s}'"))?
                as u8
        }
        Some(_) => {
            return Err(format!(
                "Invalid parameter type for '{path}.iotype', expected: string"
            ))
        }
    };
    let errno = qapi_int(m, path, "errno")?.unwrap_or(i64::from(libc::EIO));
    let sector = qapi_int(m, path, "sector")?.unwrap_or(-1);
    let once = qapi_bool(m, path, "once")?.unwrap_or(false);
    let immediately = qapi_bool(m, path, "immediately")?.unwrap_or(false);
    Ok(Rule {
        event,
        state: state_int(state),
        action: Action::Inject(Inject {
            errno: errno_int(errno),
            once,
            immediately,
            offset: sector_offset(sector),
            iotypes,
        }),
    })
}

fn inline_set(m: &Map<String, Value>, path: &str) -> Result<Rule, String> {
    unexpected(m, path, &["event", "state", "new_state"])?;
    let event = qapi_event(m, path)?;
    let state = qapi_int(m, path, "state")?.unwrap_or(0);
    let Some(new_state) = qapi_int(m, path, "new_state")? else {
        return Err(format!("Parameter '{path}.new_state' is missing"));
    };
    Ok(Rule {
        event,
        state: state_int(state),
        action: Action::SetState(state_int(new_state)),
    })
}

/// QEMU keeps `state` and `errno` in a C int.
fn state_int(v: i64) -> i64 {
    i64::from(v as i32)
}

fn errno_int(v: i64) -> i64 {
    i64::from(v as i32)
}

fn parse_perms(v: Option<&Value>, name: &str) -> Result<Perm, String> {
    let Some(v) = v else {
        return Ok(Perm::NONE);
    };
    let mut p = Perm::NONE;
    for (i, it) in list_items(v, name)?.into_iter().enumerate() {
        let Value::String(s) = it else {
            return Err(format!(
                "Invalid parameter type for '{name}[{i}]', expected: string"
            ));
        };
        p = p | match s.as_str() {
            "consistent-read" => Perm::CONSISTENT_READ,
            "write" => Perm::WRITE,
            "write-unchanged" => Perm::WRITE_UNCHANGED,
            "resize" => Perm::RESIZE,
            // QEMU 7.2's words, 'null' and all.
            _ => return Err(format!("Parameter 'null' does not accept value '{s}'")),
        };
    }
    Ok(p)
}

/// A QemuOpts number: strtoull with base 0 (0x hex, 0 octal), an
/// optional sign (a negative one wraps), nothing after it.
fn parse_qemu_number(s: &str) -> Option<i64> {
    let t = s.trim_start();
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        u64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse::<u64>().ok()?
    };
    let v = v as i64;
    Some(if neg { v.wrapping_neg() } else { v })
}

fn qemu_opts_bool(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{name}' expects 'on' or 'off'")),
    }
}

/// One group of the config file, checked as QEMU's qemu_opts_from_qdict
/// checks it.
fn config_group(
    group: &str,
    kv: &[(String, String)],
    inject: &mut Vec<Map<String, Value>>,
    set: &mut Vec<Map<String, Value>>,
) -> Result<(), String> {
    let (known, target): (&[&str], &mut Vec<_>) = match group {
        "inject-error" => (
            &[
                "event",
                "state",
                "iotype",
                "errno",
                "sector",
                "once",
                "immediately",
            ],
            inject,
        ),
        "set-state" => (&["event", "state", "new_state"], set),
        _ => return Err(format!("There is no option group '{group}'")),
    };
    let mut m = Map::new();
    for (k, v) in kv {
        if k == "id" {
            continue;
        }
        if !known.contains(&k.as_str()) {
            return Err(format!("Invalid parameter '{k}'"));
        }
        let val = match k.as_str() {
            "state" | "errno" | "sector" | "new_state" => Value::from(
                parse_qemu_number(v).ok_or_else(|| format!("Parameter '{k}' expects a number"))?,
            ),
            "once" | "immediately" => Value::Bool(qemu_opts_bool(k, v)?),
            _ => Value::String(v.clone()),
        };
        m.insert(k.clone(), val);
    }
    target.push(m);
    Ok(())
}

/// QEMU's qemu_config_parse of a blkdebug config file, then add_rule for
/// each group: the inject-error rules and the set-state rules.
pub fn parse_config(text: &str) -> Result<(Vec<Rule>, Vec<Rule>), String> {
    let mut inject = Vec::new();
    let mut set = Vec::new();
    let mut group: Option<(String, Vec<(String, String)>)> = None;
    for line in text.split_inclusive('\n') {
        if line.starts_with('\n') || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            // `[group "id"]` or `[group]`.
            let name = match rest.split_once(']') {
                Some((inside, _)) if !inside.is_empty() => {
                    let g = inside.split_whitespace().next().unwrap_or("");
                    Some(g.chars().take(63).collect::<String>())
                }
                _ => None,
            };
            if let Some(name) = name.filter(|n| !n.is_empty()) {
                if let Some((g, kv)) = group.take() {
                    config_group(&g, &kv, &mut inject, &mut set)?;
                }
                let mut kv = Vec::new();
                if let Some(id) = rest.split('"').nth(1) {
                    kv.push(("id".to_string(), id.to_string()));
                }
                group = Some((name, kv));
                continue;
            }
        }
        // ` %63s = "%1023[^"]"`: the first word, and the quoted value if
        // the rest has that shape (else an empty value, as sscanf's count
        // still says the word was read).
        let t = line.trim_start();
        let word_len = t.find(char::is_whitespace).unwrap_or(t.len());
        if word_len == 0 {
            return Err("parse error".into());
        }
        let cut = t
            .char_indices()
            .nth(63)
            .map(|(i, _)| i)
            .unwrap_or(t.len())
            .min(word_len);
        let (arg, rest) = t.split_at(cut);
        let value = rest
            .trim_start()
            .strip_prefix('=')
            .map(str::trim_start)
            .and_then(|r| r.strip_prefix('"'))
            .map(|r| r.split('"').next().unwrap_or("").replace('\n', ""))
            .unwrap_or_default();
        let Some((_, kv)) = group.as_mut() else {
            return Err("no group defined".into());
        };
        kv.retain(|(k, _)| k != arg);
        kv.push((arg.to_string(), value));
    }
    if let Some((g, kv)) = group.take() {
        config_group(&g, &kv, &mut inject, &mut set)?;
    }
    let rule = |m: &Map<String, Value>, inj: bool| -> Result<Rule, String> {
        let event = match m.get("event") {
            Some(Value::String(s)) => {
                DebugEvent::from_name(s).ok_or_else(|| format!("invalid parameter value: {s}"))?
            }
            _ => return Err("Missing event name for rule".into()),
        };
        let int = |k: &str, d: i64| m.get(k).and_then(Value::as_i64).unwrap_or(d);
        let boolean = |k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
        let action = if inj {
            let iotypes = match m.get("iotype").and_then(Value::as_str) {
                None => DEFAULT_IOTYPES,
                Some(s) => {
                    1 << IoType::from_name(s)
                        .ok_or_else(|| format!("invalid parameter value: {s}"))?
                        as u8
                }
            };
            Action::Inject(Inject {
                errno: errno_int(int("errno", i64::from(libc::EIO))),
                once: boolean("once"),
                immediately: boolean("immediately"),
                offset: sector_offset(int("sector", -1)),
                iotypes,
            })
        } else {
            Action::SetState(state_int(int("new_state", 0)))
        };
        Ok(Rule {
            event,
            state: state_int(int("state", 0)),
            action,
        })
    };
    let inject = inject
        .iter()
        .map(|m| rule(m, true))
        .collect::<Result<_, _>>()?;
    let set = set
        .iter()
        .map(|m| rule(m, false))
        .collect::<Result<_, _>>()?;
    Ok((inject, set))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inj(event: DebugEvent, errno: i64, once: bool) -> Rule {
        Rule {
            event,
            state: 0,
            action: Action::Inject(Inject {
                errno,
                once,
                immediately: false,
                offset: None,
                iotypes: DEFAULT_IOTYPES,
            }),
        }
    }

    #[test]
    fn a_rule_fails_requests_only_after_its_event_and_once_removes_it() {
        let mut r = Rules::new(vec![inj(DebugEvent::L2Load, 28, true)]);
        assert_eq!(r.check(0, 512, IoType::Write), None);
        r.event(DebugEvent::ClusterAlloc);
        assert_eq!(r.check(0, 512, IoType::Write), None);
        r.event(DebugEvent::L2Load);
        assert_eq!(
            r.check(0, 512, IoType::Read),
            Some((28, false, DebugEvent::L2Load))
        );
        assert_eq!(r.check(0, 512, IoType::Read), None);
        // Removed for good: the event does not bring it back.
        r.event(DebugEvent::L2Load);
        assert_eq!(r.check(0, 512, IoType::Read), None);
    }

    #[test]
    fn a_rule_without_once_stays_active_until_another_event_activates_rules() {
        let mut r = Rules::new(vec![
            inj(DebugEvent::L2Load, 5, false),
            inj(DebugEvent::L1Update, 28, false),
        ]);
        r.event(DebugEvent::L2Load);
        assert_eq!(r.check(0, 1, IoType::Flush).map(|x| x.0), Some(5));
        assert_eq!(r.check(0, 1, IoType::Write).map(|x| x.0), Some(5));
        // An event without rules leaves the active ones.
        r.event(DebugEvent::CowRead);
        assert_eq!(r.check(0, 1, IoType::Write).map(|x| x.0), Some(5));
        r.event(DebugEvent::L1Update);
        assert_eq!(r.check(0, 1, IoType::Write).map(|x| x.0), Some(28));
    }

    #[test]
    fn states_gate_rules_and_set_state_moves_after_the_event() {
        let set = |event, state, new| Rule {
            event,
            state,
            action: Action::SetState(new),
        };
        let mut only2 = inj(DebugEvent::L2Load, 5, false);
        only2.state = 2;
        let mut r = Rules::new(vec![only2, set(DebugEvent::L2Load, 1, 2)]);
        // In state 1 the rule does not act; the event moves to state 2.
        r.event(DebugEvent::L2Load);
        assert_eq!(r.check(0, 1, IoType::Write), None);
        assert_eq!(r.state, 2);
        r.event(DebugEvent::L2Load);
        assert_eq!(r.check(0, 1, IoType::Write).map(|x| x.0), Some(5));
    }

    #[test]
    fn sector_and_iotype_select_requests() {
        let mut rule = inj(DebugEvent::None, 5, false);
        if let Action::Inject(i) = &mut rule.action {
            i.offset = sector_offset(8);
            i.iotypes = 1 << IoType::Write as u8;
        }
        let mut r = Rules::new(vec![rule]);
        r.event(DebugEvent::None);
        assert_eq!(r.check(4096, 512, IoType::Read), None);
        assert_eq!(r.check(0, 4096, IoType::Write), None);
        assert!(r.check(0, 4097, IoType::Write).is_some());
        assert!(r.check(4096, 512, IoType::Write).is_some());
        // A flush has no bytes: a rule with a sector never fails it.
        assert_eq!(r.check(0, 0, IoType::Flush), None);
    }

    #[test]
    fn config_file_as_qemu_parses_it() {
        let (i, s) = parse_config(
            "# c\n[inject-error]\nevent = \"l2_load\"\nerrno = \"28\"\nonce = \"on\"\n\n[set-state \"x\"]\nevent = \"l2_load\"\nnew_state = \"0x2\"\n",
        )
        .unwrap();
        assert_eq!(i, vec![inj(DebugEvent::L2Load, 28, true)]);
        assert_eq!(s[0].action, Action::SetState(2));
        let err = |t: &str| parse_config(t).unwrap_err();
        assert_eq!(
            err("[inject-error]\nevent = \"foo\"\n"),
            "invalid parameter value: foo"
        );
        assert_eq!(
            err("[inject-error]\nerrno = \"5\"\n"),
            "Missing event name for rule"
        );
        assert_eq!(
            err("[inject-error]\nbogus = \"5\"\n"),
            "Invalid parameter 'bogus'"
        );
        assert_eq!(
            err("[bogus]\nevent = \"l2_load\"\n"),
            "There is no option group 'bogus'"
        );
        assert_eq!(err("event = \"l2_load\"\n"), "no group defined");
        assert_eq!(
            err("[inject-error]\nevent l2_load\n"),
            "invalid parameter value: "
        );
        assert_eq!(
            err("[inject-error]\nevent = \"l2_load\"\nerrno = \"x\"\n"),
            "Parameter 'errno' expects a number"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"l2_load\"\nonce = \"maybe\"\n"),
            "Parameter 'once' expects 'on' or 'off'"
        );
        assert_eq!(parse_qemu_number("-5"), Some(-5));
        assert_eq!(parse_qemu_number("010"), Some(8));
    }
}
