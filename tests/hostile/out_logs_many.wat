;; Class 7: 100,000 short log lines. Ignores error codes; the host must cap lines per run, say how many
;; it dropped, and store a bounded log. Output: the first non-zero code, as one ASCII digit.
(module
  (import "wasmflow" "log" (func $log (param i32 i32 i32) (result i32)))
  (import "wasmflow" "set_output" (func $output (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "flood line, again")
  (func (export "_start")
    (local $i i32) (local $code i32) (local $first i32)
    (loop $again
      (local.set $code (call $log (i32.const 2) (i32.const 0) (i32.const 17)))
      (if (i32.and (i32.ne (local.get $code) (i32.const 0)) (i32.eqz (local.get $first)))
        (then (local.set $first (local.get $code))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 100000))))
    (i32.store8 (i32.const 100) (i32.add (i32.const 48) (local.get $first)))
    (drop (call $output (i32.const 100) (i32.const 1)))))
