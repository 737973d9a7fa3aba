//! Safe Rust API for wasmflow guests.
//!
//! A guest is a WASI command (`fn main`) that the host runs once per event. This crate wraps every
//! function of the `wasmflow` import module (see `docs/abi.md`) so an agent reads like ordinary Rust:
//!
//! ```no_run
//! use wasmflow::{info, kv, output};
//!
//! fn main() -> wasmflow::Result<()> {
//!     let name = wasmflow::event::name()?;
//!     let count = kv::get_json::<u64>("count")?.unwrap_or(0) + 1;
//!     kv::set_json("count", &count)?;
//!     info!("event {} seen {} times", name, count);
//!     output::set_str(&format!("{}: {}", name, count))
//! }
//! ```
//!
//! Every call returns [`Result`]; the host never traps on a guest's mistake, it returns an
//! [`Error`] the guest can handle: its [`ErrorKind`] (the ABI code) and the host's message saying why
//! (`Display` shows both). WASI-NN errors ([`nn::Error`]) convert into [`Error`], so `?` works
//! across the two. The raw imports are in [`sys`] for code that needs them.

#![warn(missing_docs)]

pub mod sys;

mod error;
mod result;

pub mod config;
pub mod event;
pub mod github;
pub mod http;
pub mod kv;
pub mod llm;
pub mod log;
pub mod output;
pub mod response;
pub mod secrets;
pub mod nn;

pub use error::{Error, ErrorKind, Result};
pub use http::Method;
pub use event::{run_info, RunInfo};

/// Re-exported so guests can derive `Deserialize`/`Serialize` for [`event::parse`] and friends
/// without depending on a second copy (use `#[serde(crate = "wasmflow::serde")]` with the derives).
pub use serde;
/// Re-exported for building and reading JSON values ([`event::json`], [`output::set_json`]).
pub use serde_json;
