//! hostile-bad-pointers: calls the raw imports with ranges outside linear memory.
//!
//! Every call must come back as BAD_POINTER (4), never as a trap of the host or a write elsewhere.
//! Each code is printed as `name=code`; the guest exits with status 3 when all of them were 4
//! (tests look for that exit code and the lines) and 0 otherwise, so a mistake in the host shows.
//!
//! The huge lengths go to calls without a size limit of their own (a config key, a header), where
//! the only correct answer is BAD_POINTER; `log` and `set_output` may answer TOO_LARGE or cut first.

use wasmflow::sys;

/// Far past the end of any memory a 32-bit guest can have.
const OUT_OF_RANGE: usize = 0xFFFF_FFF0;
/// A descriptor pointer whose 8 bytes would wrap past 4 GiB.
const OUT_WRAP: usize = 0xFFFF_FFFC;
/// A length no memory reaches, from a valid pointer.
const HUGE: usize = 0x7FFF_FFFF;

fn main() {
    let key = b"key";
    let bad = OUT_OF_RANGE as *const u8;
    let mut out = [0u8; 16];
    let out_ptr = out.as_mut_ptr();
    let mut codes: Vec<(&str, i32)> = unsafe {
        vec![
            ("log", sys::log(2, bad, 100)),
            ("kv_set", sys::kv_set(bad, 100, key.as_ptr(), key.len())),
            ("kv_set_value", sys::kv_set(key.as_ptr(), key.len(), bad, 100)),
            ("kv_get", sys::kv_get(bad, 100, out_ptr)),
            ("event_body", sys::event_body(OUT_WRAP as *mut u8)),
            ("event_name", sys::event_name(OUT_OF_RANGE as *mut u8)),
            ("set_output", sys::set_output(bad, 100)),
            ("config_get_huge_len", sys::config_get(key.as_ptr(), HUGE, out_ptr)),
            ("set_response_header_huge_len", sys::set_response_header(key.as_ptr(), HUGE, key.as_ptr(), 1)),
            ("http_request_out", sys::http_request(bad, 100, key.as_ptr(), 0, OUT_WRAP as *mut u8)),
        ]
    };
    // A real handle read into a buffer outside memory: the host must check before it copies.
    let code = unsafe { sys::event_name(out_ptr) };
    if code == sys::OK {
        let handle = u32::from_le_bytes([out[0], out[1], out[2], out[3]]);
        let len = u32::from_le_bytes([out[4], out[5], out[6], out[7]]) as usize;
        codes.push(("result_read", unsafe { sys::result_read(handle, OUT_OF_RANGE as *mut u8, len) }));
    } else {
        codes.push(("event_name_valid", code));
    }
    let mut all_bad_pointer = true;
    for (name, code) in &codes {
        println!("{}={}", name, code);
        all_bad_pointer &= *code == 4;
    }
    std::process::exit(if all_bad_pointer { 3 } else { 0 });
}
