;; Class 7: response header values as large as the guest's memory (30 MiB each), set again and again
;; under a 40 MiB memory cap. The host must refuse them without copying them. Output: the first
;; non-zero code, as one ASCII digit.
(module
  (import "wasmflow" "set_response_header" (func $header (param i32 i32 i32 i32) (result i32)))
  (import "wasmflow" "set_output" (func $output (param i32 i32) (result i32)))
  (memory (export "memory") 600)
  (data (i32.const 0) "x-huge")
  (func (export "_start")
    (local $i i32) (local $code i32) (local $first i32)
    (memory.fill (i32.const 64) (i32.const 97) (i32.const 31457280))
    (loop $again
      (local.set $code (call $header (i32.const 0) (i32.const 6) (i32.const 64) (i32.const 31457280)))
      (if (i32.and (i32.ne (local.get $code) (i32.const 0)) (i32.eqz (local.get $first)))
        (then (local.set $first (local.get $code))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 8))))
    (i32.store8 (i32.const 32) (i32.add (i32.const 48) (local.get $first)))
    (drop (call $output (i32.const 32) (i32.const 1)))))
