//! Keeping the layer across `execve` when the program passes its own
//! environment.
//!
//! A child started with the inherited `environ` keeps `LD_PRELOAD` and the
//! session variables by itself. A program that builds a fresh environment for a
//! child (Python's `subprocess.run(..., env={...})`, a supervisor) would drop
//! them and its child would run outside the session; `execve` adds them back.
//! A program that clears `LD_PRELOAD` explicitly while keeping the session
//! variables is respected.

use std::{
    ffi::{CStr, CString},
    os::raw::{c_char, c_int},
    sync::OnceLock,
};

use graft_protocol::layer::{CONFIG_ENV, SOCKET_ENV};

use crate::guard::hooked;

/// The `NAME=value` entries a child needs to stay in the session, captured from
/// this process's environment at load time.
static SESSION_ENV: OnceLock<Vec<CString>> = OnceLock::new();

/// Captures the session variables; called by the constructor.
pub(crate) fn init() {
    let entries = ["LD_PRELOAD", SOCKET_ENV, CONFIG_ENV]
        .iter()
        .filter_map(|name| {
            let value = std::env::var(name).ok()?;
            CString::new(format!("{name}={value}")).ok()
        })
        .collect();
    let _ = SESSION_ENV.set(entries);
}

/// Whether `envp` (a NULL-terminated array) has an entry for `name`.
///
/// # Safety
///
/// `envp` must be a valid NULL-terminated array of C strings.
unsafe fn has_var(envp: *const *const c_char, name: &str) -> bool {
    let mut p = envp;
    // SAFETY: the caller guarantees a NULL-terminated array of valid C strings.
    unsafe {
        while !(*p).is_null() {
            let entry = CStr::from_ptr(*p).to_bytes();
            if entry.len() > name.len()
                && entry.starts_with(name.as_bytes())
                && entry[name.len()] == b'='
            {
                return true;
            }
            p = p.add(1);
        }
    }
    false
}

/// `execve(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: forwards the caller's arguments unchanged.
    let real = || unsafe {
        real!(execve(path, argv, envp): fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int)
    };
    // Stolen connections passed ahead are close-on-exec: the proxy keeps them
    // for whichever process accepts them.
    hooked(|| (), crate::socket::ahead::give_back);
    // SAFETY: execve(2) requires envp to be null or a valid NULL-terminated array.
    if envp.is_null() || unsafe { has_var(envp, SOCKET_ENV) } {
        return real();
    }
    hooked(real, || {
        let Some(extra) = SESSION_ENV.get() else {
            return real();
        };
        let mut entries: Vec<*const c_char> = Vec::new();
        let mut p = envp;
        // SAFETY: as above; we only copy the pointers.
        unsafe {
            while !(*p).is_null() {
                entries.push(*p);
                p = p.add(1);
            }
        }
        for entry in extra {
            let name = entry
                .to_bytes()
                .split(|b| *b == b'=')
                .next()
                .unwrap_or_default();
            let name = std::str::from_utf8(name).unwrap_or_default();
            // SAFETY: `envp` is valid as above.
            if !unsafe { has_var(envp, name) } {
                entries.push(entry.as_ptr());
            }
        }
        entries.push(std::ptr::null());
        layer_log!(
            debug,
            "execve: restoring the session environment for the child"
        );
        // SAFETY: `entries` is a NULL-terminated array of valid C strings that
        // outlive the call (on success execve does not return).
        unsafe {
            real!(execve(path, argv, entries.as_ptr())
                : fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int)
        }
    })
}
