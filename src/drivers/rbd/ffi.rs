//! librados and librbd, loaded at run time (dlopen), as QEMU's block-rbd
//! module is: the daemon builds and runs without Ceph; only a node of
//! driver `rbd` needs the libraries. Only the functions used are
//! declared (librados.h, librbd.h of Ceph 16).
//!
//! `VHOST_USER_BLKD_LIBRBD` / `VHOST_USER_BLKD_LIBRADOS` name other files
//! to load (tests use them to see the error when the library is missing).

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

pub type rados_t = *mut c_void;
pub type rados_ioctx_t = *mut c_void;
pub type rbd_image_t = *mut c_void;
pub type rbd_completion_t = *mut c_void;
pub type rbd_callback_t = extern "C" fn(rbd_completion_t, *mut c_void);
pub type diff_cb = extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int;

/// librbd.h's RBD_FEATURE_FAST_DIFF and RBD_FLAG_FAST_DIFF_INVALID.
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
pub const RBD_FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

pub struct Lib {
    pub rados_create2:
        unsafe extern "C" fn(*mut rados_t, *const c_char, *const c_char, u64) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(rados_t, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(rados_t, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(rados_t) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(rados_t),
    pub rados_ioctx_create:
        unsafe extern "C" fn(rados_t, *const c_char, *mut rados_ioctx_t) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(rados_ioctx_t),
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(rados_ioctx_t, *const c_char),
    pub rbd_open: unsafe extern "C" fn(
        rados_ioctx_t,
        *const c_char,
        *mut rbd_image_t,
        *const c_char,
    ) -> c_int,
    pub rbd_open_read_only: unsafe extern "C" fn(
        rados_ioctx_t,
        *const c_char,
        *mut rbd_image_t,
        *const c_char,
    ) -> c_int,
    pub rbd_close: unsafe extern "C" fn(rbd_image_t) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(rbd_image_t, *mut u64) -> c_int,
    pub rbd_get_features: unsafe extern "C" fn(rbd_image_t, *mut u64) -> c_int,
    pub rbd_get_flags: unsafe extern "C" fn(rbd_image_t, *mut u64) -> c_int,
    pub rbd_resize: unsafe extern "C" fn(rbd_image_t, u64) -> c_int,
    pub rbd_invalidate_cache: unsafe extern "C" fn(rbd_image_t) -> c_int,
    pub rbd_create: unsafe extern "C" fn(rados_ioctx_t, *const c_char, u64, *mut c_int) -> c_int,
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, rbd_callback_t, *mut rbd_completion_t) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(rbd_completion_t) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(rbd_completion_t),
    pub rbd_aio_readv: unsafe extern "C" fn(
        rbd_image_t,
        *const libc::iovec,
        c_int,
        u64,
        rbd_completion_t,
    ) -> c_int,
    pub rbd_aio_writev: unsafe extern "C" fn(
        rbd_image_t,
        *const libc::iovec,
        c_int,
        u64,
        rbd_completion_t,
    ) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(rbd_image_t, rbd_completion_t) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(rbd_image_t, u64, u64, rbd_completion_t) -> c_int,
    pub rbd_aio_write_zeroes:
        unsafe extern "C" fn(rbd_image_t, u64, usize, rbd_completion_t, c_int, c_int) -> c_int,
    pub rbd_diff_iterate2: unsafe extern "C" fn(
        rbd_image_t,
        *const c_char,
        u64,
        u64,
        u8,
        u8,
        diff_cb,
        *mut c_void,
    ) -> c_int,
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by
    // libdl, valid until the next dl* call on this thread; copied at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

fn open(env: &str, default: &str) -> Result<*mut c_void, String> {
    let name = std::env::var(env).unwrap_or_else(|_| default.to_string());
    let c = CString::new(name.clone()).map_err(|_| format!("bad library name '{name}'"))?;
    // SAFETY: a NUL-terminated name; the handle is never closed (the
    // library stays for the process's life, as its threads may).
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        return Err(format!(
            "the rbd driver needs {name} (Debian: apt-get install librbd1): {}",
            dlerror()
        ));
    }
    Ok(h)
}

macro_rules! sym {
    ($h:expr, $name:ident) => {{
        let c = concat!(stringify!($name), "\0");
        // SAFETY: a NUL-terminated name looked up in a library handle.
        let p = unsafe { libc::dlsym($h, c.as_ptr().cast()) };
        if p.is_null() {
            return Err(format!(
                "the rbd driver needs {} in librbd/librados: {}",
                stringify!($name),
                dlerror()
            ));
        }
        // SAFETY: the symbol is the function librados.h/librbd.h declare
        // with exactly this signature (the field's type).
        unsafe { std::mem::transmute::<*mut c_void, _>(p) }
    }};
}

impl Lib {
    // Each transmute's target is the type of the field it initialises.
    #[allow(clippy::missing_transmute_annotations)]
    fn load() -> Result<Lib, String> {
        let rados = open("VHOST_USER_BLKD_LIBRADOS", "librados.so.2")?;
        let rbd = open("VHOST_USER_BLKD_LIBRBD", "librbd.so.1")?;
        Ok(Lib {
            rados_create2: sym!(rados, rados_create2),
            rados_conf_read_file: sym!(rados, rados_conf_read_file),
            rados_conf_set: sym!(rados, rados_conf_set),
            rados_connect: sym!(rados, rados_connect),
            rados_shutdown: sym!(rados, rados_shutdown),
            rados_ioctx_create: sym!(rados, rados_ioctx_create),
            rados_ioctx_destroy: sym!(rados, rados_ioctx_destroy),
            rados_ioctx_set_namespace: sym!(rados, rados_ioctx_set_namespace),
            rbd_open: sym!(rbd, rbd_open),
            rbd_open_read_only: sym!(rbd, rbd_open_read_only),
            rbd_close: sym!(rbd, rbd_close),
            rbd_get_size: sym!(rbd, rbd_get_size),
            rbd_get_features: sym!(rbd, rbd_get_features),
            rbd_get_flags: sym!(rbd, rbd_get_flags),
            rbd_resize: sym!(rbd, rbd_resize),
            rbd_invalidate_cache: sym!(rbd, rbd_invalidate_cache),
            rbd_create: sym!(rbd, rbd_create),
            rbd_aio_create_completion: sym!(rbd, rbd_aio_create_completion),
            rbd_aio_get_return_value: sym!(rbd, rbd_aio_get_return_value),
            rbd_aio_release: sym!(rbd, rbd_aio_release),
            rbd_aio_readv: sym!(rbd, rbd_aio_readv),
            rbd_aio_writev: sym!(rbd, rbd_aio_writev),
            rbd_aio_flush: sym!(rbd, rbd_aio_flush),
            rbd_aio_discard: sym!(rbd, rbd_aio_discard),
            rbd_aio_write_zeroes: sym!(rbd, rbd_aio_write_zeroes),
            rbd_diff_iterate2: sym!(rbd, rbd_diff_iterate2),
        })
    }
}

/// The libraries, loaded on first use (once: a failure is remembered).
pub fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(Lib::load).as_ref().map_err(Clone::clone)
}

/// The directory librbd would be loaded from, without loading it (the
/// sandbox lets the armed daemon read it, so that a later blockdev-add
/// can load the libraries and their plugins).
pub fn library_dir() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("VHOST_USER_BLKD_LIBRBD") {
        let p = std::path::PathBuf::from(p);
        return p
            .exists()
            .then(|| p.parent().map(|d| d.to_path_buf()))
            .flatten();
    }
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|d| d.join("librbd.so.1").exists())
}
