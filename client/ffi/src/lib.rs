//! kv739 C API over the replikv client: `libkv739.so` / `libkv739.a`, declared in
//! `include/lib739kv.h`.
//!
//! - [`args`]: reading C strings and writing C buffers with every length bounded, and the
//!   kv739 rules for keys, values and server addresses.
//! - [`session`]: the process-wide client between `kv739_init` and `kv739_shutdown`, and
//!   how a forked child gets a session of its own.
//!
//! Every exported function validates all of its arguments before touching the store, runs
//! its body inside `catch_unwind` (a Rust panic unwinding into C is undefined behaviour),
//! and maps every failure to -1. Calls block for at most the per-call deadline
//! (`KV739_TIMEOUT_MS`, default 10 s); inside it the client retries on other servers with
//! the same request id, so a retried put is applied once and still returns the value it
//! replaced (docs/design.md §6).

use std::ffi::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub mod args;
pub mod session;

use args::{MAX_KEY_SIZE, MAX_SERVERS, MAX_SERVER_ADDR, MAX_VALUE_SIZE};

/// Success; for get/put: the key existed.
const OK: c_int = 0;
/// get/put: the key did not exist.
const NOT_FOUND: c_int = 1;
/// Any failure: bad arguments, no session, or no server completed the call in time.
const FAILED: c_int = -1;

/// Runs an exported body, turning a panic into -1 instead of unwinding into C.
fn guarded(body: impl FnOnce() -> c_int) -> c_int {
    // AssertUnwindSafe: after a panic nothing observes the closure's captures again, and
    // the global session is only ever replaced whole (see `session`).
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(FAILED)
}

/// Connects to the servers in the NULL-terminated `server_list` of `"host:port"` strings.
///
/// Returns 0 once some listed server answered, -1 if the list is NULL, empty or has a
/// malformed entry, if a session is already up, or if no server answered within the init
/// deadline (`KV739_INIT_TIMEOUT_MS`, default 5 s). A repeated entry counts once.
///
/// # Safety
/// `server_list` is NULL or a NULL-terminated array of NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn kv739_init(server_list: *mut *mut c_char) -> c_int {
    guarded(|| {
        init_debug_log();
        if server_list.is_null() {
            return FAILED;
        }
        let mut servers = Vec::new();
        for i in 0..=MAX_SERVERS {
            // SAFETY: the array is NULL-terminated and we stop at its terminator; the
            // MAX_SERVERS bound only guards against a missing one.
            let entry = unsafe { *server_list.add(i) };
            if entry.is_null() {
                break;
            }
            if i == MAX_SERVERS {
                return FAILED;
            }
            // SAFETY: a non-NULL entry is a NUL-terminated string.
            let Some(text) = (unsafe { args::bounded_cstr(entry, MAX_SERVER_ADDR) }) else {
                return FAILED;
            };
            let Some(server) = args::parse_server(text) else {
                return FAILED;
            };
            // The client refuses a list naming a server twice (it would skew random
            // routing); for kv739 a repeated entry is harmless, so keep the first.
            if !servers.contains(&server) {
                servers.push(server);
            }
        }
        if servers.is_empty() {
            return FAILED;
        }
        match session::init(servers) {
            Ok(()) => OK,
            Err(_) => FAILED,
        }
    })
}

/// Ends the session and frees its resources; `kv739_init` may be called again after it.
///
/// Returns 0, or -1 if no session was up. Calls still in flight on other threads finish
/// normally; calls that start afterwards return -1.
#[no_mangle]
pub extern "C" fn kv739_shutdown() -> c_int {
    guarded(|| if session::shutdown() { OK } else { FAILED })
}

/// Reads `key` into `value` (room for `MAX_VALUE_SIZE + 1` bytes, NUL-terminated).
///
/// Returns 0 with the value, 1 if the key does not exist (`value` = ""), -1 on failure
/// (`value` = "" when non-NULL). A stored value that is not a valid kv739 value (longer
/// than `MAX_VALUE_SIZE` or not printable ASCII, written by another kind of client) is -1.
///
/// # Safety
/// `key` is NULL or NUL-terminated; `value` is NULL or writable for `MAX_VALUE_SIZE + 1`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn kv739_get(key: *mut c_char, value: *mut c_char) -> c_int {
    guarded(|| {
        // SAFETY: per this function's contract.
        let rc = unsafe { get(key, value) };
        if rc != OK {
            // SAFETY: NULL-checked inside; otherwise the caller's buffer.
            unsafe { args::clear(value) };
        }
        rc
    })
}

/// # Safety
/// As for [`kv739_get`].
unsafe fn get(key: *const c_char, value: *mut c_char) -> c_int {
    if value.is_null() {
        return FAILED;
    }
    // SAFETY: NULL or NUL-terminated, per the contract.
    let Some(key) = (unsafe { args::bounded_cstr(key, MAX_KEY_SIZE) }) else {
        return FAILED;
    };
    if !args::is_valid_key(key) {
        return FAILED;
    }
    let Some(client) = session::current() else {
        return FAILED;
    };
    match client.get(key.to_vec()) {
        // SAFETY: `value` is non-NULL with room for MAX_VALUE_SIZE + 1 bytes.
        Ok(Some(found)) if unsafe { args::write_value(value, &found) } => OK,
        Ok(Some(_)) => FAILED,
        Ok(None) => NOT_FOUND,
        Err(e) => failed("get", &e),
    }
}

/// Stores `value` under `key`; the value it replaced goes to `old_value` (room for
/// `MAX_VALUE_SIZE + 1` bytes, NUL-terminated).
///
/// Returns 0 with the old value, 1 if the key did not exist (`old_value` = ""), -1 on
/// failure (`old_value` = "" when non-NULL). Invalid arguments store nothing. If the
/// replaced value is not a valid kv739 value (longer than `MAX_VALUE_SIZE` or not
/// printable ASCII, written by another kind of client), the new value *is* stored but the
/// call returns -1 rather than truncate: a caller never sees a wrong old value as success.
/// `value` and `old_value` may be the same buffer.
///
/// # Safety
/// `key` and `value` are NULL or NUL-terminated; `old_value` is NULL or writable for
/// `MAX_VALUE_SIZE + 1` bytes.
#[no_mangle]
pub unsafe extern "C" fn kv739_put(
    key: *mut c_char,
    value: *mut c_char,
    old_value: *mut c_char,
) -> c_int {
    guarded(|| {
        // SAFETY: per this function's contract.
        let rc = unsafe { put(key, value, old_value) };
        if rc != OK {
            // SAFETY: NULL-checked inside; otherwise the caller's buffer. `value` was
            // copied before this point, so clearing a shared buffer loses nothing.
            unsafe { args::clear(old_value) };
        }
        rc
    })
}

/// # Safety
/// As for [`kv739_put`].
unsafe fn put(key: *const c_char, value: *const c_char, old_value: *mut c_char) -> c_int {
    if old_value.is_null() {
        return FAILED;
    }
    // SAFETY: NULL or NUL-terminated, per the contract.
    let Some(key) = (unsafe { args::bounded_cstr(key, MAX_KEY_SIZE) }) else {
        return FAILED;
    };
    // SAFETY: as above.
    let Some(value) = (unsafe { args::bounded_cstr(value, MAX_VALUE_SIZE) }) else {
        return FAILED;
    };
    if !args::is_valid_key(key) || !args::is_valid_value(value) {
        return FAILED;
    }
    // Own copies before any output is written: `value` may alias `old_value`.
    let (key, value) = (key.to_vec(), value.to_vec());
    let Some(client) = session::current() else {
        return FAILED;
    };
    match client.put(key, value) {
        // SAFETY: `old_value` is non-NULL with room for MAX_VALUE_SIZE + 1 bytes.
        Ok(Some(old)) if unsafe { args::write_value(old_value, &old) } => OK,
        Ok(Some(_)) => FAILED,
        Ok(None) => NOT_FOUND,
        Err(e) => failed("put", &e),
    }
}

/// Whether `KV739_DEBUG` is set (to anything but empty or 0).
fn debug_on() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var("KV739_DEBUG").is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// With `KV739_DEBUG` on, the client's own account of each failed attempt (which server,
/// what error) goes to stderr too: a call that returns -1 after many attempts can then be
/// followed attempt by attempt. Installed once; a program with its own tracing subscriber
/// keeps it.
fn init_debug_log() {
    if debug_on() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("replikv_client=debug"))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    }
}

/// -1 for a get or put the client gave up on. With `KV739_DEBUG` on the reason goes to
/// stderr, one line per call: the return code alone cannot tell a deadline from an unknown
/// outcome or a refused user.
fn failed(op: &str, e: &replikv_client::Error) -> c_int {
    if debug_on() {
        eprintln!("kv739: {op} failed: {e}");
    }
    FAILED
}
