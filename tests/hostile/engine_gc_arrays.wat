;; Class 5: GC arrays live outside linear memory, where the memory cap does not look. The guest keeps
;; allocating 8 MiB arrays and holds them in a table; the module must be refused at load.
(module
  (type $bytes (array (mut i8)))
  (memory (export "memory") 1)
  (table $keep 64 anyref)
  (func (export "_start") (local $i i32)
    (loop $l
      (table.set $keep (local.get $i) (array.new_default $bytes (i32.const 8388608)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 64))))))
