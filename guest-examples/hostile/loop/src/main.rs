//! hostile-loop: spins forever. The host must end it at the flow's deadline (status `timeout`).
//!
//! The counter is read and written through volatile operations so the optimiser cannot prove the
//! loop has no effect and delete it (`std::hint::black_box` is not stable on the Debian rustc 1.63).

use core::ptr::{read_volatile, write_volatile};

fn main() {
    let mut counter: u64 = 0;
    loop {
        unsafe { write_volatile(&mut counter, read_volatile(&counter).wrapping_add(1)) };
    }
}
