;; Class 5: four growable tables. With a per-table cap of table_elements, the guest holds 4x the
;; elements the flow allows. It grows each table one element at a time (at most 5000 each) and
;; returns the total it got as a little-endian u32 in its output.
(module
  (import "wasmflow" "set_output" (func $out (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (table $t0 0 funcref)
  (table $t1 0 funcref)
  (table $t2 0 funcref)
  (table $t3 0 funcref)
  (func $grow (param $which i32) (result i32) (local $n i32) (local $r i32)
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $n) (i32.const 5000)))
        (local.set $r (i32.const -1))
        (if (i32.eq (local.get $which) (i32.const 0)) (then (local.set $r (table.grow $t0 (ref.null func) (i32.const 1)))))
        (if (i32.eq (local.get $which) (i32.const 1)) (then (local.set $r (table.grow $t1 (ref.null func) (i32.const 1)))))
        (if (i32.eq (local.get $which) (i32.const 2)) (then (local.set $r (table.grow $t2 (ref.null func) (i32.const 1)))))
        (if (i32.eq (local.get $which) (i32.const 3)) (then (local.set $r (table.grow $t3 (ref.null func) (i32.const 1)))))
        (br_if $done (i32.eq (local.get $r) (i32.const -1)))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $l)))
    (local.get $n))
  (func (export "_start")
    (i32.store (i32.const 0)
      (i32.add (i32.add (call $grow (i32.const 0)) (call $grow (i32.const 1)))
               (i32.add (call $grow (i32.const 2)) (call $grow (i32.const 3)))))
    (drop (call $out (i32.const 0) (i32.const 4)))))
