//! placeholder (being written)

/// Called by the `close` hook before a remote file's descriptor is closed.
pub(crate) fn before_close(_fd: std::os::raw::c_int, _kind: &crate::fds::FdKind) {}
