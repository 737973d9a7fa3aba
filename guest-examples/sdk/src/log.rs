//! Logs, stored with the run and shown by `wasmflow run` and `wasmflow logs`.
//!
//! Use the macros [`trace!`](crate::trace!), [`debug!`](crate::debug!), [`info!`](crate::info!),
//! [`warn!`](crate::warn!) and [`error!`](crate::error!): they take `format!` arguments and never fail
//! the agent (a log the host refuses, e.g. past the flow's `limits.log_lines`, 1,000 by default, is
//! dropped). [`write()`] returns the host's answer for code that cares.

use crate::error::check;
use crate::{sys, Result};

/// A log level; the discriminant is the ABI's level number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// 0: very detailed tracing.
    Trace = 0,
    /// 1: debugging detail.
    Debug = 1,
    /// 2: normal progress.
    Info = 2,
    /// 3: something unexpected that the agent handled.
    Warn = 3,
    /// 4: a failure.
    Error = 4,
}

/// Write one log line. Lines over 16 KiB are cut by the host.
pub fn write(level: Level, message: &str) -> Result<()> {
    check(unsafe { sys::log(level as u32, message.as_ptr(), message.len()) })
}

#[doc(hidden)]
pub fn __log(level: Level, args: std::fmt::Arguments<'_>) {
    let message = match args.as_str() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(std::fmt::format(args)),
    };
    let _ = write(level, &message);
}

/// Log at trace level, `format!`-style: `trace!("payload {:?}", body)`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::log::__log($crate::log::Level::Trace, ::std::format_args!($($arg)+)) };
}

/// Log at debug level, `format!`-style.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::log::__log($crate::log::Level::Debug, ::std::format_args!($($arg)+)) };
}

/// Log at info level, `format!`-style: `info!("got {} for {}", name, who)`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::log::__log($crate::log::Level::Info, ::std::format_args!($($arg)+)) };
}

/// Log at warn level, `format!`-style.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::log::__log($crate::log::Level::Warn, ::std::format_args!($($arg)+)) };
}

/// Log at error level, `format!`-style.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::log::__log($crate::log::Level::Error, ::std::format_args!($($arg)+)) };
}
