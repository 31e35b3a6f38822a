//! The layer's log: a file named by `LayerConfig::log_file`, never the program's
//! own stdout or stderr. Lines are `pid tid level message`.

use std::{
    fs::File,
    io::Write,
    sync::{
        OnceLock,
        atomic::{AtomicU8, Ordering},
    },
};

use graft_config::LayerConfig;

static FILE: OnceLock<File> = OnceLock::new();
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// Log levels, lowest = most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Level {
    /// Something failed that the program will notice.
    Error = 1,
    /// Something unexpected the program may not notice.
    Warn = 2,
    /// Session milestones.
    Info = 3,
    /// Every remote call.
    Debug = 4,
    /// Everything.
    Trace = 5,
}

/// Opens the log file, if configured. Called once by the constructor.
pub fn init(config: &LayerConfig) {
    let Some(path) = &config.log_file else { return };
    let level = match config.log_level.as_str() {
        "error" => Level::Error,
        "warn" => Level::Warn,
        "debug" => Level::Debug,
        "trace" => Level::Trace,
        _ => Level::Info,
    };
    if let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = FILE.set(file);
        LEVEL.store(level as u8, Ordering::Relaxed);
    }
}

/// Whether `level` is logged.
#[inline]
pub fn enabled(level: Level) -> bool {
    (level as u8) <= LEVEL.load(Ordering::Relaxed)
}

/// Writes one line. Use [`layer_log!`](crate::layer_log) instead.
pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    if let Some(mut file) = FILE.get() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let line = format!("{} {} {:?} {}\n", std::process::id(), tid, level, args);
        let _ = file.write_all(line.as_bytes());
    }
}

/// `layer_log!(debug, "format", args...)`: logs when the level is enabled.
#[macro_export]
macro_rules! layer_log {
    (error, $($t:tt)*) => { $crate::layer_log!(@ $crate::log::Level::Error, $($t)*) };
    (warn, $($t:tt)*) => { $crate::layer_log!(@ $crate::log::Level::Warn, $($t)*) };
    (info, $($t:tt)*) => { $crate::layer_log!(@ $crate::log::Level::Info, $($t)*) };
    (debug, $($t:tt)*) => { $crate::layer_log!(@ $crate::log::Level::Debug, $($t)*) };
    (trace, $($t:tt)*) => { $crate::layer_log!(@ $crate::log::Level::Trace, $($t)*) };
    (@ $level:expr, $($t:tt)*) => {
        if $crate::log::enabled($level) {
            $crate::log::write($level, format_args!($($t)*));
        }
    };
}
