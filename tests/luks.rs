//! driver=luks against QEMU 7.2's tools: volumes qemu-img makes open here
//! and what we write reads back in qemu-io, volumes we make (`create -f
//! luks`, blockdev-create) open in qemu-img and compare identical; a
//! wrong passphrase is refused with QEMU's words; a second key slot
//! opens; the passphrase appears in no log and no query output.
//!
//! The daemon serves the luks node over NBD, so that qemu-img and qemu-io
//! read and write it as a guest would.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Daemon, Qmp};
use serde_json::json;

const PW: &str = "correct horse battery";

fn sh(cmd: &str, args: &[&str]) -> String {
    let mut out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    // qemu-img create times PBKDF2 with getrusage and gives up now and
    // then on a busy machine ("Unable to get accurate CPU usage").
    for _ in 0..5 {
        if out.status.success()
            || !String::from_utf8_lossy(&out.stderr).contains("Unable to get accurate CPU usage")
        {
            break;
        }
        out = Command::new(cmd).args(args).output().unwrap();
    }
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn secret(id: &str, pw: &str) -> String {
    format!("secret,id={id},data={pw}")
}

/// The luks image as qemu-img/qemu-io open it.
fn luks_opts(img: &Path, id: &str) -> String {
    format!("driver=luks,key-secret={id},file.filename={}", p(img))
}

fn nbd_opts(sock: &Path) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={},export=d",
        p(sock)
    )
}

/// A daemon serving `img` as a luks node over NBD (and a QMP monitor).
fn serve(dir: tempfile::TempDir, img: &Path, pw: &str) -> Daemon {
    let s = secret("sec0", pw);
    let f = format!("driver=file,node-name=f,filename={}", p(img));
    let args = [
        "--object",
        s.as_str(),
        "--blockdev",
        f.as_str(),
        "--blockdev",
        "driver=luks,node-name=d,file=f,key-secret=sec0",
        "--nbd-server",
        "addr.type=unix,addr.path={sock}",
        "--export",
        "type=nbd,id=e0,node-name=d,writable=on",
        "--chardev",
        "socket,id=m0,path={dir}/qmp.sock,server=on,wait=off",
        "--monitor",
        "chardev=m0",
    ];
    let d = Daemon::start_in(dir, &args);
    d.wait_ready();
    d
}

/// Writes through the daemon with qemu-io, checks that qemu-img sees the
/// volume and the export identical while the daemon runs, stops it, then
/// reads what it wrote with QEMU's own luks driver.
fn write_through_daemon_and_check_in_qemu(dir: tempfile::TempDir, img: &Path) {
    let d = serve(dir, img, PW);
    let nbd = nbd_opts(&d.socket);
    sh(
        "qemu-io",
        &[
            "--image-opts",
            "-c",
            "write -P 0xa5 1536 5k",
            "-c",
            "write -P 0x3c 1M 192k",
            nbd.as_str(),
        ],
    );
    let s = secret("sec0", PW);
    let l = luks_opts(img, "sec0");
    let out = sh(
        "qemu-img",
        &["compare", "-U", "--object", &s, "--image-opts", &l, &nbd],
    );
    assert!(out.contains("Images are identical"), "{out}");
    let mut d = d;
    assert!(d.terminate().success(), "{}", d.log());
    let log = d.log();
    assert!(!log.contains(PW), "the passphrase is in the log:\n{log}");
    let out = sh(
        "qemu-io",
        &[
            "--object",
            &s,
            "--image-opts",
            "-c",
            "read -P 0xa5 1536 5k",
            "-c",
            "read -P 0x3c 1M 192k",
            &l,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn qemu_img_volumes_open_here_and_our_writes_read_back_in_qemu() {
    for opts in [
        "cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256",
        "cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha1",
        "cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha256",
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha1",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("q.luks");
        let s = secret("sec0", PW);
        sh(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "luks",
                "--object",
                &s,
                "-o",
                &format!("key-secret=sec0,iter-time=10,{opts}"),
                p(&img),
                "4M",
            ],
        );
        // QEMU writes first: the daemon must read it identically.
        sh(
            "qemu-io",
            &[
                "--object",
                &s,
                "--image-opts",
                "-c",
                "write -P 0x11 0 512k",
                "-c",
                "write -P 0x22 3M 4k",
                &luks_opts(&img, "sec0"),
            ],
        );
        write_through_daemon_and_check_in_qemu(dir, &img);
    }
}

#[test]
fn volumes_we_create_open_in_qemu() {
    for opts in [
        "",
        ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha1",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("ours.luks");
        let s = secret("sec0", PW);
        let o = format!("key-secret=sec0,iter-time=10{opts}");
        let out = sh(
            common::daemon_bin(),
            &[
                "create",
                "--object",
                &s,
                "-f",
                "luks",
                "-o",
                &o,
                p(&img),
                "4M",
            ],
        );
        assert!(!out.contains(PW), "{out}");
        let info = sh(
            "qemu-img",
            &[
                "info",
                "--object",
                &s,
                "--image-opts",
                &luks_opts(&img, "sec0"),
            ],
        );
        assert!(info.contains("virtual size: 4 MiB"), "{info}");
        sh(
            "qemu-io",
            &[
                "--object",
                &s,
                "--image-opts",
                "-c",
                "write -P 0x77 2M 64k",
                &luks_opts(&img, "sec0"),
            ],
        );
        write_through_daemon_and_check_in_qemu(dir, &img);
    }
}

#[test]
fn a_wrong_passphrase_is_refused_with_qemus_message() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.luks");
    let s = secret("sec0", PW);
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            &s,
            "-o",
            "key-secret=sec0,iter-time=10",
            p(&img),
            "4M",
        ],
    );
    let bad = secret("sec0", "not the passphrase");
    let f = format!("driver=file,node-name=f,filename={}", p(&img));
    let (code, err) = common::run_daemon(&[
        "--object",
        &bad,
        "--blockdev",
        &f,
        "--blockdev",
        "driver=luks,node-name=d,file=f,key-secret=sec0",
        "--export",
        "type=vhost-user-blk,id=e0,node-name=d,addr.type=unix,addr.path=/nonexistent/x.sock",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("Invalid password, cannot unlock any keyslot"),
        "{err}"
    );
    assert!(!err.contains("not the passphrase"), "{err}");
    // QEMU says the same about it.
    let out = Command::new("qemu-io")
        .args(["--object", &bad, "-c", "read 0 512", "--image-opts"])
        .arg(luks_opts(&img, "sec0"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("Invalid password, cannot unlock any keyslot"));
}

#[test]
fn a_second_key_slot_opens_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.luks");
    let s0 = secret("sec0", "first passphrase");
    let s1 = secret("sec1", PW);
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            &s0,
            "-o",
            "key-secret=sec0,iter-time=10",
            p(&img),
            "4M",
        ],
    );
    sh(
        "qemu-img",
        &[
            "amend",
            "--object",
            &s0,
            "--object",
            &s1,
            "--image-opts",
            "-o",
            "state=active,new-secret=sec1,keyslot=3,iter-time=10",
            &luks_opts(&img, "sec0"),
        ],
    );
    sh(
        "qemu-io",
        &[
            "--object",
            &s0,
            "--image-opts",
            "-c",
            "write -P 0x99 0 64k",
            &luks_opts(&img, "sec0"),
        ],
    );
    // Slot 0 fails with PW, slot 3 opens.
    write_through_daemon_and_check_in_qemu(dir, &img);
}

fn wait_concluded(qmp: &mut Qmp, id: &str) {
    loop {
        let ev = qmp.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(30));
        if ev["data"]["id"] == id && ev["data"]["status"] == "concluded" {
            return;
        }
    }
}

#[test]
fn blockdev_create_makes_a_volume_qemu_opens_and_no_query_shows_the_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("q.luks");
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            &secret("sec0", PW),
            "-o",
            "key-secret=sec0,iter-time=10",
            p(&img),
            "4M",
        ],
    );
    let d = serve(dir, &img, PW);
    let mut qmp = Qmp::connect(&d.dir.path().join("qmp.sock"));
    let new = d.dir.path().join("new.luks");
    let r = qmp.execute(
        "blockdev-create",
        json!({"job-id": "c0", "options": {"driver": "file", "filename": new, "size": 0}}),
    );
    assert!(r.get("return").is_some(), "{r}");
    wait_concluded(&mut qmp, "c0");
    let r = qmp.execute(
        "object-add",
        json!({"qom-type": "secret", "id": "sec9", "data": "the second passphrase"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "nf", "filename": new}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let r = qmp.execute(
        "blockdev-create",
        json!({"job-id": "c1", "options": {"driver": "luks", "file": "nf", "size": 2 << 20,
               "key-secret": "sec9", "cipher-alg": "aes-128", "cipher-mode": "cbc",
               "ivgen-alg": "essiv", "hash-alg": "sha1", "iter-time": 10}}),
    );
    assert!(r.get("return").is_some(), "{r}");
    wait_concluded(&mut qmp, "c1");
    let jobs = qmp.execute("query-jobs", json!({}));
    assert!(!jobs.to_string().contains("\"error\""), "{jobs}");
    // An encrypted qcow2 through blockdev-create too.
    let newq = d.dir.path().join("new.qcow2");
    let r = qmp.execute(
        "blockdev-create",
        json!({"job-id": "c2", "options": {"driver": "file", "filename": newq, "size": 0}}),
    );
    assert!(r.get("return").is_some(), "{r}");
    wait_concluded(&mut qmp, "c2");
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": "nq", "filename": newq}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let r = qmp.execute(
        "blockdev-create",
        json!({"job-id": "c3", "options": {"driver": "qcow2", "file": "nq", "size": 2 << 20,
               "encrypt": {"format": "luks", "key-secret": "sec9", "iter-time": 10}}}),
    );
    assert!(r.get("return").is_some(), "{r}");
    wait_concluded(&mut qmp, "c3");
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "qq", "file": "nq",
               "encrypt": {"format": "luks", "key-secret": "sec9"}}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let reply = qmp.execute("query-named-block-nodes", json!({}));
    let qq = reply["return"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "qq"))
        .cloned()
        .unwrap_or_else(|| panic!("no node qq: {reply}"));
    assert_eq!(qq["encrypted"], true, "{qq}");
    for n in ["qq", "nq"] {
        let r = qmp.execute("blockdev-del", json!({"node-name": n}));
        assert!(r.get("return").is_some(), "{r}");
    }
    let r = qmp.execute(
        "blockdev-add",
        json!({"driver": "luks", "node-name": "nl", "file": "nf", "key-secret": "sec9"}),
    );
    assert!(r.get("return").is_some(), "{r}");
    let reply = qmp.execute("query-named-block-nodes", json!({}));
    let nl = reply["return"]
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == "nl"))
        .cloned()
        .unwrap_or_else(|| panic!("no node nl: {reply}"));
    assert_eq!(nl["drv"], "luks", "{nl}");
    assert_eq!(nl["encrypted"], true, "{nl}");
    let nodes = reply.to_string();
    for pw in [PW, "the second passphrase"] {
        assert!(
            !nodes.contains(pw),
            "query-named-block-nodes shows it: {nodes}"
        );
        let dump = qmp.execute("query-block", json!({})).to_string();
        assert!(!dump.contains(pw), "{dump}");
    }
    let r = qmp.execute("blockdev-del", json!({"node-name": "nl"}));
    assert!(r.get("return").is_some(), "{r}");
    let r = qmp.execute("blockdev-del", json!({"node-name": "nf"}));
    assert!(r.get("return").is_some(), "{r}");
    let mut d = d;
    assert!(d.terminate().success());
    let log = d.log();
    assert!(
        !log.contains(PW) && !log.contains("the second passphrase"),
        "{log}"
    );
    let s = secret("s", "the second passphrase");
    let info = sh(
        "qemu-img",
        &[
            "info",
            "--object",
            &s,
            "--image-opts",
            &luks_opts(&new, "s"),
        ],
    );
    assert!(
        info.contains("virtual size: 2 MiB") && info.contains("cipher mode: cbc"),
        "{info}"
    );
    let qopts = format!(
        "driver=qcow2,encrypt.format=luks,encrypt.key-secret=s,file.filename={}",
        p(&newq)
    );
    let check = sh(
        "qemu-img",
        &["check", "--object", &s, "--image-opts", &qopts],
    );
    assert!(check.contains("No errors were found"), "{check}");
    let out = sh(
        "qemu-io",
        &[
            "--object",
            &s,
            "--image-opts",
            "-c",
            "write -P 0x5 0 64k",
            "-c",
            "read -P 0x5 0 64k",
            &qopts,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// A daemon serving the encrypted qcow2 `img` over NBD.
fn serve_qcow2(dir: tempfile::TempDir, img: &Path, pw: &str, backing: Option<&Path>) -> Daemon {
    let s = secret("sec0", pw);
    let f = format!("driver=file,node-name=f,filename={}", p(img));
    let mut args: Vec<String> = vec!["--object".into(), s, "--blockdev".into(), f];
    let mut q =
        "driver=qcow2,node-name=d,file=f,encrypt.format=luks,encrypt.key-secret=sec0".to_string();
    if let Some(b) = backing {
        args.push("--blockdev".into());
        args.push(format!(
            "driver=file,node-name=bf,filename={},read-only=on",
            p(b)
        ));
        args.push("--blockdev".into());
        args.push("driver=raw,node-name=b,file=bf,read-only=on".into());
        q.push_str(",backing=b");
    }
    args.push("--blockdev".into());
    args.push(q);
    for a in [
        "--nbd-server",
        "addr.type=unix,addr.path={sock}",
        "--export",
        "type=nbd,id=e0,node-name=d,writable=on",
    ] {
        args.push(a.into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start_in(dir, &args);
    d.wait_ready();
    d
}

/// qcow2 with `encrypt.format=luks` as qemu-img makes it: QEMU's data
/// reads back identically, our writes (in place, allocating with
/// copy-on-write of zeroes and of a plain backing file's data, several
/// clusters at once) read back in qemu-io, and `qemu-img check` finds the
/// image clean.
#[test]
fn encrypted_qcow2_from_qemu_img_reads_and_writes_both_ways() {
    for with_backing in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("e.qcow2");
        let s = secret("sec0", PW);
        let base = dir.path().join("base.raw");
        let mut create = vec![
            "create".to_string(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "--object".into(),
            s.clone(),
            "-o".into(),
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=64k"
                .into(),
        ];
        if with_backing {
            sh("qemu-img", &["create", "-q", "-f", "raw", p(&base), "4M"]);
            sh(
                "qemu-io",
                &["-f", "raw", "-c", "write -P 0xbb 0 4M", p(&base)],
            );
            create.extend(["-b".into(), p(&base).into(), "-F".into(), "raw".into()]);
        }
        create.extend([p(&img).to_string(), "4M".into()]);
        let create: Vec<&str> = create.iter().map(String::as_str).collect();
        sh("qemu-img", &create);
        let qopts = format!(
            "driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0,file.filename={}",
            p(&img)
        );
        sh(
            "qemu-io",
            &[
                "--object",
                &s,
                "--image-opts",
                "-c",
                "write -P 0x11 0 96k",
                "-c",
                "write -P 0x22 1M 4k",
                &qopts,
            ],
        );
        let d = serve_qcow2(dir, &img, PW, with_backing.then_some(base.as_path()));
        let nbd = nbd_opts(&d.socket);
        let mut cmp = vec![
            "compare",
            "-U",
            "--object",
            &s,
            "--image-opts",
            &qopts,
            &nbd,
        ];
        let out = sh("qemu-img", &cmp);
        assert!(out.contains("Images are identical"), "{out}");
        sh(
            "qemu-io",
            &[
                "--image-opts",
                // In place (cluster 0), allocating inside a cluster (COW of
                // zeroes or of the backing file), across clusters.
                "-c",
                "write -P 0xa1 4k 8k",
                "-c",
                "write -P 0xa2 2M 4k",
                "-c",
                "write -P 0xa3 3207168 136k",
                nbd.as_str(),
            ],
        );
        let out = sh("qemu-img", &cmp);
        assert!(out.contains("Images are identical"), "{out}");
        let mut d = d;
        assert!(d.terminate().success(), "{}", d.log());
        assert!(!d.log().contains(PW));
        let fill = if with_backing { "0xbb" } else { "0" };
        let out = sh(
            "qemu-io",
            &[
                "--object",
                &s,
                "--image-opts",
                "-c",
                "read -P 0x11 0 4k",
                "-c",
                "read -P 0xa1 4k 8k",
                "-c",
                "read -P 0x11 12k 84k",
                "-c",
                &format!("read -P {fill} 2093056 4k"),
                "-c",
                "read -P 0xa2 2M 4k",
                "-c",
                &format!("read -P {fill} 2101248 60k"),
                "-c",
                &format!("read -P {fill} 3M 60k"),
                "-c",
                "read -P 0xa3 3207168 136k",
                "-c",
                &format!("read -P {fill} 3346432 60k"),
                &qopts,
            ],
        );
        assert!(!out.contains("Pattern verification failed"), "{out}");
        let check = sh(
            "qemu-img",
            &["check", "--object", &s, "--image-opts", &qopts],
        );
        assert!(check.contains("No errors were found"), "{check}");
        cmp.clear();
    }
}

/// An encrypted qcow2 with a wrong passphrase, or without one, is refused
/// with QEMU's messages.
#[test]
fn encrypted_qcow2_wrong_passphrase_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("e.qcow2");
    let s = secret("sec0", PW);
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &s,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            p(&img),
            "4M",
        ],
    );
    let bad = secret("sec0", "not the passphrase");
    let f = format!("driver=file,node-name=f,filename={}", p(&img));
    for (q, want) in [
        (
            "driver=qcow2,node-name=d,file=f",
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
        (
            "driver=qcow2,node-name=d,file=f,encrypt.format=luks,encrypt.key-secret=sec0",
            "Invalid password, cannot unlock any keyslot",
        ),
    ] {
        let (code, err) = common::run_daemon(&[
            "--object",
            &bad,
            "--blockdev",
            &f,
            "--blockdev",
            q,
            "--export",
            "type=vhost-user-blk,id=e0,node-name=d,addr.type=unix,addr.path=/nonexistent/x.sock",
        ]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(want), "{q}: {err}");
        assert!(!err.contains("not the passphrase"), "{err}");
    }
}

/// `create -f qcow2 -o encrypt.format=luks,...` makes an image QEMU opens,
/// writes and checks clean; what the daemon writes to it reads back in
/// qemu-io.
#[test]
fn encrypted_qcow2_we_create_opens_in_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ours.qcow2");
    let s = secret("sec0", PW);
    let out = sh(
        common::daemon_bin(),
        &[
            "create",
            "--object",
            &s,
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.cipher-alg=aes-128",
            p(&img),
            "4M",
        ],
    );
    assert!(!out.contains(PW), "{out}");
    let qopts = format!(
        "driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0,file.filename={}",
        p(&img)
    );
    let info = sh(
        "qemu-img",
        &["info", "--object", &s, "--image-opts", &qopts],
    );
    assert!(
        info.contains("encrypted: yes") && info.contains("cipher mode: cbc"),
        "{info}"
    );
    sh(
        "qemu-io",
        &[
            "--object",
            &s,
            "--image-opts",
            "-c",
            "write -P 0x55 64k 64k",
            &qopts,
        ],
    );
    let d = serve_qcow2(dir, &img, PW, None);
    let nbd = nbd_opts(&d.socket);
    sh(
        "qemu-io",
        &[
            "--image-opts",
            "-c",
            "read -P 0x55 64k 64k",
            "-c",
            "write -P 0x66 1M 8k",
            nbd.as_str(),
        ],
    );
    let mut d = d;
    assert!(d.terminate().success(), "{}", d.log());
    let out = sh(
        "qemu-io",
        &[
            "--object",
            &s,
            "--image-opts",
            "-c",
            "read -P 0x55 64k 64k",
            "-c",
            "read -P 0x66 1M 8k",
            "-c",
            "read -P 0 1056768 57344",
            &qopts,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let check = sh(
        "qemu-img",
        &["check", "--object", &s, "--image-opts", &qopts],
    );
    assert!(check.contains("No errors were found"), "{check}");
}

/// An encrypted qcow2 left dirty (lazy refcounts, qemu-io aborted) has its
/// refcounts rebuilt at open: the encryption header's clusters stay
/// counted, so qemu-img check finds the image clean afterwards and the
/// data reads back.
#[test]
fn encrypted_qcow2_refcount_rebuild_keeps_the_encryption_header() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dirty.qcow2");
    let s = secret("sec0", PW);
    sh(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &s,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,lazy_refcounts=on",
            p(&img),
            "4M",
        ],
    );
    let qopts = format!(
        "driver=qcow2,encrypt.format=luks,encrypt.key-secret=sec0,file.filename={}",
        p(&img)
    );
    // qemu-io's abort leaves the dirty bit set.
    let _ = Command::new("qemu-io")
        .args([
            "--object",
            &s,
            "--image-opts",
            "-c",
            "write -P 0x44 0 128k",
            "-c",
            "abort",
        ])
        .arg(&qopts)
        .output()
        .unwrap();
    let info = sh("qemu-img", &["info", "-U", p(&img)]);
    assert!(info.contains("corrupt: false"), "{info}");
    let d = serve_qcow2(dir, &img, PW, None);
    let nbd = nbd_opts(&d.socket);
    sh(
        "qemu-io",
        &[
            "--image-opts",
            "-c",
            "read -P 0x44 0 128k",
            "-c",
            "write -P 0x45 1M 64k",
            nbd.as_str(),
        ],
    );
    let mut d = d;
    assert!(d.terminate().success(), "{}", d.log());
    let check = sh(
        "qemu-img",
        &["check", "--object", &s, "--image-opts", &qopts],
    );
    assert!(check.contains("No errors were found"), "{check}");
    let out = sh(
        "qemu-io",
        &[
            "--object",
            &s,
            "--image-opts",
            "-c",
            "read -P 0x44 0 128k",
            "-c",
            "read -P 0x45 1M 64k",
            &qopts,
        ],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// cryptsetup's volumes: a LUKS1 one (2 MiB payload alignment) opens and
/// its data goes both ways with QEMU; LUKS2, which QEMU 7.2 cannot open
/// either, is refused with QEMU's message. cryptsetup comes from
/// cryptsetup-bin (scripts/guest/install-deps.sh).
#[test]
fn cryptsetup_luks1_opens_and_luks2_is_refused_as_qemu_does() {
    let cs = ["/usr/sbin/cryptsetup", "/sbin/cryptsetup"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("cryptsetup is missing (cryptsetup-bin; scripts/guest/install-deps.sh)");
    let dir = tempfile::tempdir().unwrap();
    let kf = dir.path().join("key");
    std::fs::write(&kf, PW).unwrap();
    let img = dir.path().join("cs1.img");
    let img2 = dir.path().join("cs2.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    std::fs::File::create(&img2)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    sh(
        cs,
        &[
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks1",
            "--iter-time",
            "10",
            "--key-file",
            p(&kf),
            p(&img),
        ],
    );
    sh(
        cs,
        &[
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--iter-time",
            "10",
            "--key-file",
            p(&kf),
            p(&img2),
        ],
    );
    let s = secret("sec0", PW);
    sh(
        "qemu-io",
        &[
            "--object",
            &s,
            "--image-opts",
            "-c",
            "write -P 0x31 0 64k",
            &luks_opts(&img, "sec0"),
        ],
    );
    let f2 = format!("driver=file,node-name=f,filename={}", p(&img2));
    let (code, err) = common::run_daemon(&[
        "--object",
        &s,
        "--blockdev",
        &f2,
        "--blockdev",
        "driver=luks,node-name=d,file=f,key-secret=sec0",
        "--export",
        "type=vhost-user-blk,id=e0,node-name=d,addr.type=unix,addr.path=/nonexistent/x.sock",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("LUKS version 2 is not supported"), "{err}");
    write_through_daemon_and_check_in_qemu(dir, &img);
}
