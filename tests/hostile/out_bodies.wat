;; Class 7: an output of 2 MiB and a response body of 9 MiB, both over their default caps. Output: the
;; two codes as two ASCII digits (set_output's, then set_response_body's), in a 2-byte output.
(module
  (import "wasmflow" "set_output" (func $output (param i32 i32) (result i32)))
  (import "wasmflow" "set_response_body" (func $body (param i32 i32) (result i32)))
  (memory (export "memory") 160)
  (func (export "_start")
    (local $a i32) (local $b i32)
    (memory.fill (i32.const 1024) (i32.const 111) (i32.const 9437184))
    (local.set $a (call $output (i32.const 1024) (i32.const 2097152)))
    (local.set $b (call $body (i32.const 1024) (i32.const 9437184)))
    (i32.store8 (i32.const 0) (i32.add (i32.const 48) (local.get $a)))
    (i32.store8 (i32.const 1) (i32.add (i32.const 48) (local.get $b)))
    (drop (call $output (i32.const 0) (i32.const 2)))))
