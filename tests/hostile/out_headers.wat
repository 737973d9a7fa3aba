;; Class 7: a million response headers. Ignores every error code and keeps going; the host must cap the
;; count and stay small. Output: the first non-zero code it got, as one ASCII digit ("0" if none).
(module
  (import "wasmflow" "set_response_header" (func $header (param i32 i32 i32 i32) (result i32)))
  (import "wasmflow" "set_output" (func $output (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "x-flood")
  (data (i32.const 16) "a value that is not short, repeated a million times over")
  (func (export "_start")
    (local $i i32) (local $code i32) (local $first i32)
    (loop $again
      (local.set $code (call $header (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 56)))
      (if (i32.and (i32.ne (local.get $code) (i32.const 0)) (i32.eqz (local.get $first)))
        (then (local.set $first (local.get $code))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 1000000))))
    (i32.store8 (i32.const 100) (i32.add (i32.const 48) (local.get $first)))
    (drop (call $output (i32.const 100) (i32.const 1)))))
