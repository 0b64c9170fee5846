//! Running nftables commands: in this process through libnftables (the library the `nft`
//! command is a thin front of) when it can be loaded, else by running `nft`.
//!
//! Why in-process: a migration's cut-over is two switch transactions, and starting `nft` for
//! each costs ~16 ms here (measured: 10 `nft -f -` runs of a two-element transaction in
//! 160 ms), where the same transaction through the library takes well under a millisecond.
//! The library is loaded at run time (`libnftables.so.1`, part of the `nftables` package the
//! set-up installs), so nothing is needed to build, and a machine without it still works,
//! just slower.
//!
//! A libnftables context talks to the kernel over a netlink socket bound to the network
//! namespace it was made in, so contexts are kept per namespace (the lab runs the switch's
//! commands on a thread that entered the switch's namespace).

use super::SwitchError;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// `NFT_CTX_OUTPUT_JSON` of `nftables/libnftables.h`.
const OUTPUT_JSON: c_uint = 1 << 4;

type CtxNew = unsafe extern "C" fn(c_uint) -> *mut c_void;
type CtxFree = unsafe extern "C" fn(*mut c_void);
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGet = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type SetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

struct Library {
    _lib: libloading::Library,
    ctx_new: CtxNew,
    ctx_free: CtxFree,
    buffer_output: CtxInt,
    buffer_error: CtxInt,
    output: CtxGet,
    error: CtxGet,
    set_flags: SetFlags,
    run: RunCmd,
}

/// One libnftables context (`struct nft_ctx *`), with buffered output and errors.
struct Context(*mut c_void);

// SAFETY: a context is only ever used under the `CONTEXTS` mutex, by one thread at a time;
// libnftables keeps no thread-local state in it.
unsafe impl Send for Context {}

fn library() -> Option<&'static Library> {
    static LIB: OnceLock<Option<Library>> = OnceLock::new();
    LIB.get_or_init(|| {
        // SAFETY: loading libnftables runs its initialisers, which only set up its own state.
        let lib = unsafe { libloading::Library::new("libnftables.so.1") }.ok()?;
        // SAFETY: these are the documented signatures of libnftables(3); the function pointers
        // stay valid while `_lib` is loaded, which is as long as the process (it lives in a
        // static that is never dropped).
        unsafe {
            Some(Library {
                ctx_new: *lib.get::<CtxNew>(b"nft_ctx_new\0").ok()?,
                ctx_free: *lib.get::<CtxFree>(b"nft_ctx_free\0").ok()?,
                buffer_output: *lib.get::<CtxInt>(b"nft_ctx_buffer_output\0").ok()?,
                buffer_error: *lib.get::<CtxInt>(b"nft_ctx_buffer_error\0").ok()?,
                output: *lib.get::<CtxGet>(b"nft_ctx_get_output_buffer\0").ok()?,
                error: *lib.get::<CtxGet>(b"nft_ctx_get_error_buffer\0").ok()?,
                set_flags: *lib.get::<SetFlags>(b"nft_ctx_output_set_flags\0").ok()?,
                run: *lib.get::<RunCmd>(b"nft_run_cmd_from_buffer\0").ok()?,
                _lib: lib,
            })
        }
    })
    .as_ref()
}

/// The inode of this thread's network namespace.
fn netns_id() -> Option<u64> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

static CONTEXTS: Mutex<Option<HashMap<u64, Context>>> = Mutex::new(None);

/// Runs `cmds` (one transaction) through libnftables; `None` if the library is unavailable.
fn run_in_process(cmds: &str, json: bool) -> Option<Result<String, String>> {
    let lib = library()?;
    let ns = netns_id()?;
    let text = CString::new(cmds).ok()?;
    let mut guard = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    let ctx = match map.entry(ns) {
        std::collections::hash_map::Entry::Occupied(e) => e.get().0,
        std::collections::hash_map::Entry::Vacant(v) => {
            // SAFETY: nft_ctx_new(NFT_CTX_DEFAULT) has no preconditions; null is checked.
            let ctx = unsafe { (lib.ctx_new)(0) };
            if ctx.is_null() {
                return None;
            }
            // SAFETY: `ctx` is a live context; buffering makes the library keep output and
            // errors for us instead of printing them.
            unsafe {
                (lib.buffer_output)(ctx);
                (lib.buffer_error)(ctx);
            }
            v.insert(Context(ctx)).0
        }
    };
    // SAFETY: `ctx` is a live context used by this thread alone (the mutex is held); `text`
    // is a NUL-terminated string that outlives the call; the buffers returned are owned by
    // the context and copied before the next call on it.
    unsafe {
        (lib.set_flags)(ctx, if json { OUTPUT_JSON } else { 0 });
        let rc = (lib.run)(ctx, text.as_ptr());
        let read = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let out = read((lib.output)(ctx));
        let err = read((lib.error)(ctx));
        Some(if rc == 0 { Ok(out) } else { Err(err) })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        if let Some(lib) = library() {
            // SAFETY: the context is live and dropped once.
            unsafe { (lib.ctx_free)(self.0) }
        }
    }
}

fn nft_command(args: &[&str], stdin: Option<&str>) -> Result<Result<String, String>, SwitchError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(SwitchError::NftMissing)?;
    if let (Some(mut pipe), Some(text)) = (child.stdin.take(), stdin) {
        pipe.write_all(text.as_bytes())
            .map_err(SwitchError::NftMissing)?;
    }
    let out = child.wait_with_output().map_err(SwitchError::NftMissing)?;
    Ok(if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    })
}

/// Applies `script` as one transaction.
pub fn apply(script: &str) -> Result<(), SwitchError> {
    let r = match run_in_process(script, false) {
        Some(r) => r,
        None => nft_command(&["-f", "-"], Some(script))?,
    };
    r.map(|_| ()).map_err(|stderr| SwitchError::Nft {
        stderr: stderr.trim().to_string(),
        script: script.to_string(),
    })
}

/// `list table ip TABLE` as JSON text; `Ok(None)` if there is no such table.
pub fn list_json(table: &str) -> Result<Option<String>, SwitchError> {
    let cmd = format!("list table ip {table}");
    let r = match run_in_process(&cmd, true) {
        Some(r) => r,
        None => nft_command(&["-j", "list", "table", "ip", table], None)?,
    };
    match r {
        Ok(out) => Ok(Some(out)),
        Err(e) if e.contains("No such file") => Ok(None),
        Err(e) => Err(SwitchError::Nft {
            stderr: e.trim().to_string(),
            script: cmd,
        }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_library_loads_where_nftables_is_installed() {
        if std::path::Path::new("/usr/sbin/nft").exists() {
            assert!(super::library().is_some(), "libnftables.so.1 should load");
        }
    }
}
