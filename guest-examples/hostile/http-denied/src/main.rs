//! hostile-http-denied: requests a URL the flow does not allow (config `url`, default
//! `http://127.0.0.1:9/`). The host answers DENIED, the `expect` panics, and the run's status is
//! `denied`.

use wasmflow::http::Request;

fn main() {
    let url = wasmflow::config::get("url")
        .expect("config")
        .unwrap_or_else(|| "http://127.0.0.1:9/".to_string());
    let response = Request::get(&url).send().expect("HTTP request");
    println!("status {}: {}", response.status, response.text());
}
