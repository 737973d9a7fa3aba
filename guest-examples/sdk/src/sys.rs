//! The raw imports of the `wasmflow` module, exactly as `docs/abi.md` lists them: every function the
//! host offers in that module is declared here, and only here (a test of the host checks the two agree).
//!
//! Everything here is `unsafe`: the host checks every pointer and length against linear memory, but
//! it writes through the ones that are in range, so a wrong pointer can corrupt the guest's own
//! memory. Prefer the safe modules of this crate; these exist for tests of the host's checks and for
//! anything the safe API does not cover yet.
//!
//! Every function returns an ABI error code (0 is OK, see [`crate::ErrorKind::from_code`]); after a
//! failure, [`last_error`] describes why. Functions with an `out` parameter write an 8-byte result
//! descriptor (`u32 handle, u32 len`, little-endian) there, to be read back with [`result_read`].

#![allow(missing_docs)]

/// `0`: success.
pub const OK: i32 = 0;

#[link(wasm_import_module = "wasmflow")]
extern "C" {
    // Results
    pub fn result_read(handle: u32, buf_ptr: *mut u8, buf_len: usize) -> i32;
    /// The message of the run's most recent failed call (UTF-8, at most 4 KiB) as a result;
    /// `NOT_FOUND` if no call has failed yet.
    pub fn last_error(out: *mut u8) -> i32;

    // Event and run
    pub fn event_name(out: *mut u8) -> i32;
    pub fn event_body(out: *mut u8) -> i32;
    pub fn event_headers(out: *mut u8) -> i32;
    pub fn run_info(out: *mut u8) -> i32;

    // Logs and output
    pub fn log(level: u32, msg_ptr: *const u8, msg_len: usize) -> i32;
    pub fn set_output(ptr: *const u8, len: usize) -> i32;
    pub fn set_response_status(status: u32) -> i32;
    pub fn set_response_header(
        name_ptr: *const u8,
        name_len: usize,
        value_ptr: *const u8,
        value_len: usize,
    ) -> i32;
    pub fn set_response_body(ptr: *const u8, len: usize) -> i32;

    // Configuration and secrets
    pub fn config_get(key_ptr: *const u8, key_len: usize, out: *mut u8) -> i32;
    pub fn secret_get(name_ptr: *const u8, name_len: usize, out: *mut u8) -> i32;

    // Key-value
    pub fn kv_get(key_ptr: *const u8, key_len: usize, out: *mut u8) -> i32;
    pub fn kv_set(key_ptr: *const u8, key_len: usize, value_ptr: *const u8, value_len: usize) -> i32;
    pub fn kv_delete(key_ptr: *const u8, key_len: usize) -> i32;
    pub fn kv_keys(prefix_ptr: *const u8, prefix_len: usize, out: *mut u8) -> i32;
    /// Writes the new value, an `i64`, at `out` (8 bytes).
    pub fn kv_increment(key_ptr: *const u8, key_len: usize, delta: i64, out: *mut i64) -> i32;
    /// `expected_len == usize::MAX` (u32::MAX): the key must be absent. Writes a `u32` at `out`:
    /// 1 if the value was set, 0 if not.
    pub fn kv_cas(
        key_ptr: *const u8,
        key_len: usize,
        expected_ptr: *const u8,
        expected_len: usize,
        value_ptr: *const u8,
        value_len: usize,
        out: *mut u32,
    ) -> i32;

    // Outbound HTTP: `out` receives two descriptors (16 bytes), the head then the body.
    pub fn http_request(
        req_ptr: *const u8,
        req_len: usize,
        body_ptr: *const u8,
        body_len: usize,
        out: *mut u8,
    ) -> i32;

    // GitHub, made by the host as the App installation: `out` receives two descriptors, head then body.
    pub fn github_request(
        req_ptr: *const u8,
        req_len: usize,
        body_ptr: *const u8,
        body_len: usize,
        out: *mut u8,
    ) -> i32;
    pub fn github_info(out: *mut u8) -> i32;

    // LLM calls through the flow's `llm:` endpoints.
    pub fn llm_chat(req_ptr: *const u8, req_len: usize, out: *mut u8) -> i32;
    pub fn llm_embed(req_ptr: *const u8, req_len: usize, out: *mut u8) -> i32;
    pub fn llm_info(out: *mut u8) -> i32;
}
