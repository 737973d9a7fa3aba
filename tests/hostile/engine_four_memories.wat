;; Class 5: four linear memories, each grown to the flow's whole cap and touched page by page.
;; With a per-memory cap the guest holds 4x the cap in host RAM; the module must be refused at load.
(module
  (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
  (memory $m0 (export "memory") 1)
  (memory $m1 1)
  (memory $m2 1)
  (memory $m3 1)
  (data (memory $m0) (i32.const 0) "grown")
  (func $fill (param $pages i32) (param $which i32) (local $p i32)
    ;; write one byte into every 4 KiB of the first $pages pages of memory $which
    (loop $l
      (if (i32.eq (local.get $which) (i32.const 0)) (then (i32.store8 $m0 (local.get $p) (i32.const 1))))
      (if (i32.eq (local.get $which) (i32.const 1)) (then (i32.store8 $m1 (local.get $p) (i32.const 1))))
      (if (i32.eq (local.get $which) (i32.const 2)) (then (i32.store8 $m2 (local.get $p) (i32.const 1))))
      (if (i32.eq (local.get $which) (i32.const 3)) (then (i32.store8 $m3 (local.get $p) (i32.const 1))))
      (local.set $p (i32.add (local.get $p) (i32.const 4096)))
      (br_if $l (i32.lt_u (local.get $p) (i32.mul (local.get $pages) (i32.const 65536))))))
  (func (export "_start")
    ;; 1 + 511 pages = 32 MiB in each memory: the flow's cap in the test
    (drop (memory.grow $m0 (i32.const 511)))
    (drop (memory.grow $m1 (i32.const 511)))
    (drop (memory.grow $m2 (i32.const 511)))
    (drop (memory.grow $m3 (i32.const 511)))
    (call $fill (memory.size $m0) (i32.const 0))
    (call $fill (memory.size $m1) (i32.const 1))
    (call $fill (memory.size $m2) (i32.const 2))
    (call $fill (memory.size $m3) (i32.const 3))
    (drop (call $out (i32.const 0) (i32.const 5)))))
