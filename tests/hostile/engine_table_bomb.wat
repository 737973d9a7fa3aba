;; Class 5: one table with no maximum, grown by 16 Mi elements in one instruction. Where nothing caps
;; table elements (WasmEdge has no such setting), that is hundreds of MiB of host memory at once.
;; The guest returns table.grow's result (-1: refused) as a little-endian i32 in its output.
(module
  (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (table $t 1 funcref)
  (func (export "_start")
    (i32.store (i32.const 0) (table.grow $t (ref.null func) (i32.const 16777216)))
    (drop (call $out (i32.const 0) (i32.const 4)))))
