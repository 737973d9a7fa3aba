;; Class 5: one memory grown a page at a time, each page touched, until memory.grow fails; then the
;; guest gives up the way an allocator does (a trap). The run is `oom` and the host holds about the cap.
(module
  (memory (export "memory") 1)
  (func (export "_start") (local $p i32)
    (loop $grow
      (if (i32.ne (memory.grow (i32.const 1)) (i32.const -1))
        (then
          (local.set $p (i32.mul (i32.sub (memory.size) (i32.const 1)) (i32.const 65536)))
          (i32.store8 (local.get $p) (i32.const 1))
          (i32.store8 (i32.add (local.get $p) (i32.const 32768)) (i32.const 1))
          (br $grow))))
    unreachable))
