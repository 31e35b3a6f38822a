//! Calling the real libc function behind one of our exports.
//!
//! `real!(name(args...) : fn(types...) -> ret)` looks `name` up once with
//! `dlsym(RTLD_NEXT, "name")` (the next definition after this library in the
//! search order: libc's) and calls it. A symbol libc lacks makes the call fail
//! with `ENOSYS`, returning the `missing` value given (default `-1`).

/// Looks up and calls the real `name`. Must be used inside `unsafe`.
macro_rules! real {
    ($name:ident ( $($arg:expr),* $(,)? ) : fn( $($t:ty),* ) -> $ret:ty) => {
        real!($name($($arg),*) : fn($($t),*) -> $ret, missing = -1)
    };
    ($name:ident ( $($arg:expr),* $(,)? ) : fn( $($t:ty),* ) -> $ret:ty, missing = $missing:expr) => {{
        static PTR: ::std::sync::atomic::AtomicUsize = ::std::sync::atomic::AtomicUsize::new(0);
        let mut p = PTR.load(::std::sync::atomic::Ordering::Relaxed);
        if p == 0 {
            p = ::libc::dlsym(
                ::libc::RTLD_NEXT,
                concat!(stringify!($name), "\0").as_ptr().cast(),
            ) as usize;
            PTR.store(p, ::std::sync::atomic::Ordering::Relaxed);
        }
        if p == 0 {
            $crate::guard::set_errno(::libc::ENOSYS);
            $missing
        } else {
            let f: unsafe extern "C" fn($($t),*) -> $ret = ::std::mem::transmute(p);
            f($($arg),*)
        }
    }};
}
