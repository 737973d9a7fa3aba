;; Class 7: 100,000 log lines of 20 KiB each (2 GB of text). The host must cut each line, cap the bytes
;; logged per run, and stay small. Output: the first non-zero code, as one ASCII digit.
(module
  (import "wasmflow" "log" (func $log (param i32 i32 i32) (result i32)))
  (import "wasmflow" "set_output" (func $output (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $i i32) (local $code i32) (local $first i32)
    (memory.fill (i32.const 1024) (i32.const 108) (i32.const 20480))
    (loop $again
      (local.set $code (call $log (i32.const 3) (i32.const 1024) (i32.const 20480)))
      (if (i32.and (i32.ne (local.get $code) (i32.const 0)) (i32.eqz (local.get $first)))
        (then (local.set $first (local.get $code))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 100000))))
    (i32.store8 (i32.const 100) (i32.add (i32.const 48) (local.get $first)))
    (drop (call $output (i32.const 100) (i32.const 1)))))
