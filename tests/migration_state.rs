//! Guest-visible state a live migration must carry from the source's
//! daemon to the destination's (issue 20): QEMU does not send the write
//! cache the guest chose to the destination's backend, and the guest does
//! not ask again, so the source's export reports it (query-block-exports
//! `x-writethrough`) and the destination's export takes it
//! (x-block-export-set-writethrough) before the guest runs there.

mod common;

use common::*;
use serde_json::json;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

/// virtio_blk_config's `writeback` byte.
const WCE: u32 = 32;

fn daemon(export_extra: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join("disk.img"))
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let export = format!(
        "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={{sock}},writable=on{export_extra}"
    );
    Daemon::start_in(
        dir,
        &[
            "--blockdev",
            "driver=file,node-name=f,filename={dir}/disk.img",
            "--export",
            &export,
            "--chardev",
            "socket,id=m,path={dir}/qmp.sock,server=on,wait=off",
            "--monitor",
            "chardev=m",
        ],
    )
}

fn qmp(d: &Daemon) -> Qmp {
    Qmp::connect(&d.dir.path().join("qmp.sock"))
}

fn writethrough(q: &mut Qmp) -> bool {
    let r = q.execute("query-block-exports", json!({}));
    r["return"][0]["x-writethrough"]
        .as_bool()
        .unwrap_or_else(|| panic!("no x-writethrough in {r}"))
}

#[test]
fn the_guests_write_cache_is_reported_and_handed_to_another_export() {
    // The source: the guest turns its write cache off.
    let a = daemon("");
    let mut qa = qmp(&a);
    let mut vm = Vm::connect(&a.socket, VmOptions::default());
    assert_eq!(vm.config(WCE, 1), [1], "write-back by default");
    assert!(!writethrough(&mut qa));
    vm.frontend
        .set_config(WCE, VhostUserConfigFlags::WRITABLE, &[0])
        .unwrap();
    assert_eq!(vm.config(WCE, 1), [0]);
    assert!(writethrough(&mut qa), "the guest's choice is reported");

    // The destination: its export is told before its frontend connects,
    // and a connection made before the change sees it too.
    let b = daemon("");
    let mut qb = qmp(&b);
    let mut early = Vm::connect(&b.socket, VmOptions::default());
    assert_eq!(early.config(WCE, 1), [1]);
    let r = qb.execute(
        "x-block-export-set-writethrough",
        json!({"id": "e", "writethrough": true}),
    );
    assert_eq!(r["return"], json!({}), "{r}");
    assert_eq!(early.config(WCE, 1), [0], "applies to the device now");
    drop(early);
    let mut vm_b = Vm::connect(&b.socket, VmOptions::default());
    assert_eq!(vm_b.config(WCE, 1), [0], "a new connection starts with it");
    assert!(writethrough(&mut qb));
    // A device reset goes back to the export's setting, not the option's.
    vm_b.frontend
        .set_config(WCE, VhostUserConfigFlags::WRITABLE, &[1])
        .unwrap();
    assert_eq!(vm_b.config(WCE, 1), [1]);
    vm_b.frontend.reset_device().unwrap();
    drop(vm_b);
    let mut vm_b = Vm::connect(&b.socket, VmOptions::default());
    assert_eq!(vm_b.config(WCE, 1), [0]);
    assert_eq!(vm_b.write(0, 0, &pattern(1, 4096)), S_OK);

    // And back to write-back.
    let r = qb.execute(
        "x-block-export-set-writethrough",
        json!({"id": "e", "writethrough": false}),
    );
    assert_eq!(r["return"], json!({}), "{r}");
    assert_eq!(vm_b.config(WCE, 1), [1]);
}

#[test]
fn bad_write_cache_requests_are_refused_clearly() {
    let d = daemon(",writethrough=on");
    let mut q = qmp(&d);
    assert!(writethrough(&mut q), "the option is reported");
    let r = q.execute(
        "x-block-export-set-writethrough",
        json!({"id": "nope", "writethrough": true}),
    );
    assert_eq!(
        r["error"]["desc"], "Export 'nope' is not found",
        "unknown export: {r}"
    );
    let r = q.execute("x-block-export-set-writethrough", json!({"id": "e"}));
    assert!(
        r["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("writethrough")),
        "missing argument named: {r}"
    );
    let r = q.execute(
        "x-block-export-set-writethrough",
        json!({"id": "e", "writethrough": "maybe"}),
    );
    assert!(r.get("error").is_some(), "not a bool: {r}");
    assert!(writethrough(&mut q), "nothing changed");
}
