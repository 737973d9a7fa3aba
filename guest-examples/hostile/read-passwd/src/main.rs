//! hostile-read-passwd: tries to read the host's /etc/passwd through WASI.
//!
//! A guest has no preopened directories, so this must fail; the panic (a trap) carries the error.
//! If it ever succeeds, the contents go to stdout, where a test will see them.

fn main() {
    let contents = std::fs::read_to_string("/etc/passwd").expect("reading /etc/passwd");
    println!("{}", contents);
}
