//! hostile-membomb: allocates 1 MiB chunks, touches and keeps every one, until memory runs out.
//! The host must stop it at the flow's memory cap (status `oom`) without harm to itself.

use core::ptr::{read_volatile, write_volatile};

const CHUNK: usize = 1 << 20;

fn main() {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; CHUNK];
        // Write one byte per 4 KiB page so the memory is really committed, not just reserved.
        for i in (0..CHUNK).step_by(4096) {
            unsafe { write_volatile(chunk.as_mut_ptr().add(i), (chunks.len() & 0xff) as u8) };
        }
        chunks.push(chunk);
        let total: usize = chunks.iter().map(|c| unsafe { read_volatile(c.as_ptr()) } as usize).sum();
        unsafe { read_volatile(&total) };
    }
}
