;; Class 8: guest text that would drive the operator's terminal. Logs, writes to stdout and stderr,
;; and sets as output: Rich markup (a stray closing tag, a fake status line), OSC 8 hyperlinks, CSI
;; screen clearing, DCS/APC strings, C1 controls, bidi overrides, a carriage return and a newline
;; followed by a fake status line. Then asks for a URL full of escapes (refused: it shows up in the
;; run's error) and traps, so the run ends `denied`.
;; Generated strings; offsets are fixed below.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasmflow" "log" (func $log (param i32 i32 i32) (result i32)))
  (import "wasmflow" "set_output" (func $output (param i32 i32) (result i32)))
  (import "wasmflow" "http_request" (func $http (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "\5b\2f\78\5d")  ;; [/x]
  (data (i32.const 1036) "\5b\62\6f\6c\64\20\72\65\64\5d\6f\6b\20\20\72\75\6e\20\30\31\32\33\34\35\36\37\38\39\61\62\63\64\65\66\20\20\65\6e\67\69\6e\65\20\77\61\73\6d\74\69\6d\65\20\28\63\72\61\6e\65\6c\69\66\74\29\5b\2f\5d")  ;; [bold red]ok  run 0123456789abcdef  engine wasmtime (craneli
  (data (i32.const 1110) "\1b\5d\38\3b\3b\68\74\74\70\3a\2f\2f\65\76\69\6c\07\63\6c\69\63\6b\20\6d\65\1b\5d\38\3b\3b\07")  ;; \u001b]8;;http://evil\u0007click me\u001b]8;;\u0007
  (data (i32.const 1149) "\1b\5b\32\4a\1b\5b\48\73\63\72\65\65\6e\20\77\69\70\65\64")  ;; \u001b[2J\u001b[Hscreen wiped
  (data (i32.const 1176) "\1b\5b\33\31\6d\72\65\64\1b\5b\30\6d\20\1b\50\64\63\73\20\70\61\79\6c\6f\61\64\1b\5c\20\1b\5f\61\70\63\1b\5c\20\64\6f\6e\65")  ;; \u001b[31mred\u001b[0m \u001bPdcs payload\u001b\\ \u001b_apc
  (data (i32.const 1225) "\e2\80\ae\67\6e\70\2e\65\78\65\20\e2\81\a6\69\73\6f\6c\61\74\65\e2\81\a9")  ;; \u202egnp.exe \u2066isolate\u2069
  (data (i32.const 1257) "\c2\9b\33\31\6d\43\31\20\43\53\49\20\c2\9d\38\3b\3b\68\74\74\70\3a\2f\2f\65\76\69\6c\c2\9c")  ;; \u009b31mC1 CSI \u009d8;;http://evil\u009c
  (data (i32.const 1295) "\70\72\6f\67\72\65\73\73\0d\6f\6b\20\20\72\75\6e\20\66\61\6b\65\2d\63\61\72\72\69\61\67\65\2d\72\65\74\75\72\6e")  ;; progress\rok  run fake-carriage-return
  (data (i32.const 1340) "\66\69\72\73\74\20\6c\69\6e\65\0a\6f\6b\20\20\72\75\6e\20\30\30\30\30\30\30\30\30\30\30\30\30\30\30\30\30\20\20\65\6e\67\69\6e\65\20\77\61\73\6d\74\69\6d\65\20\28\63\72\61\6e\65\6c\69\66\74\29\20\20\66\61\6b\65")  ;; first line\nok  run 0000000000000000  engine wasmtime (crane
  (data (i32.const 1418) "\62\65\6c\6c\07\20\62\61\63\6b\73\70\61\63\65\08\20\6e\75\6c\00\20\64\65\6c\7f\20\74\61\62\09\6b\65\70\74")  ;; bell\u0007 backspace\b nul\u0000 del\u007f tab\tkept
  (data (i32.const 8192) "\7b\22\75\72\6c\22\3a\20\22\68\74\74\70\3a\2f\2f\65\76\69\6c\5c\75\30\30\31\62\5b\32\4a\2e\65\78\61\6d\70\6c\65\2f\5c\75\30\30\31\62\5d\38\3b\3b\68\74\74\70\3a\2f\2f\65\76\69\6c\5c\75\30\30\30\37\78\22\7d")
  (func $write (param $fd i32) (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (i32.store (i32.const 16) (i32.const 10))  ;; a newline after each string
    (i32.store (i32.const 8) (i32.const 16))
    (i32.store (i32.const 12) (i32.const 1))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 2) (i32.const 24))))
  (func $say (param $ptr i32) (param $len i32)
    (drop (call $log (i32.const 2) (local.get $ptr) (local.get $len)))
    (call $write (i32.const 1) (local.get $ptr) (local.get $len))
    (call $write (i32.const 2) (local.get $ptr) (local.get $len)))
  (func (export "_start")
    (call $say (i32.const 1024) (i32.const 4))
    (call $say (i32.const 1036) (i32.const 66))
    (call $say (i32.const 1110) (i32.const 31))
    (call $say (i32.const 1149) (i32.const 19))
    (call $say (i32.const 1176) (i32.const 41))
    (call $say (i32.const 1225) (i32.const 24))
    (call $say (i32.const 1257) (i32.const 30))
    (call $say (i32.const 1295) (i32.const 37))
    (call $say (i32.const 1340) (i32.const 70))
    (call $say (i32.const 1418) (i32.const 35))
    (drop (call $output (i32.const 1024) (i32.const 437)))
    (drop (call $http (i32.const 8192) (i32.const 68) (i32.const 0) (i32.const 0) (i32.const 64)))
    unreachable))
