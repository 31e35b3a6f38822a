//! The re-entrancy guard: while the layer itself runs (talking to the proxy,
//! logging, reading `/proc`), the libc functions it calls land in its own exports
//! again; those must go straight to libc.
//!
//! Also the panic boundary: a panic inside a hook must never unwind into C code.

use std::{cell::Cell, panic::AssertUnwindSafe};

thread_local! {
    // const-initialised and without a destructor, so it is usable at any point of
    // a thread's life, even while other thread-locals are being destroyed.
    static IN_LAYER: Cell<bool> = const { Cell::new(false) };
}

/// Proof that this thread is inside the layer; dropping it leaves.
#[derive(Debug)]
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        IN_LAYER.with(|g| g.set(false));
    }
}

/// Enters the layer, or returns `None` when this thread is already inside it (the
/// caller must then behave exactly like libc).
#[inline]
pub fn enter() -> Option<Guard> {
    IN_LAYER.with(|g| {
        if g.replace(true) {
            None
        } else {
            Some(Guard(()))
        }
    })
}

/// Runs `hook` with the guard held and any panic caught; runs `real` instead when
/// the thread is already inside the layer, the layer is inert, or `hook` panicked
/// (a bug: logged, and the call falls back to libc's behaviour).
#[inline]
pub fn hooked<R>(real: impl FnOnce() -> R, hook: impl FnOnce() -> R) -> R {
    if crate::state().is_none() {
        return real();
    }
    let Some(guard) = enter() else {
        return real();
    };
    match std::panic::catch_unwind(AssertUnwindSafe(hook)) {
        Ok(r) => r,
        Err(_) => {
            layer_log!(error, "a hook panicked; falling back to libc");
            drop(guard);
            real()
        }
    }
}

/// Sets the calling thread's `errno`.
pub fn set_errno(errno: i32) {
    // SAFETY: __errno_location always returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() = errno };
}

/// Reads the calling thread's `errno`.
pub fn errno() -> i32 {
    // SAFETY: as in `set_errno`.
    unsafe { *libc::__errno_location() }
}

/// What a hook's logic decided about one call: the layer's single
/// "handled / leave it to libc" type, for every hook whose work may find the
/// call is not graft's after all (a local path, a descriptor graft does not
/// know).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled<T> {
    /// Not graft's: call the real libc function.
    Libc,
    /// Done by the layer: the value, or an `errno`.
    Done(Result<T, i32>),
}

impl<T> Handled<T> {
    /// `Libc` for `None`, else `Done(Ok(v))`.
    pub fn from_value(value: Option<T>) -> Handled<T> {
        value.map_or(Handled::Libc, |v| Handled::Done(Ok(v)))
    }
}
