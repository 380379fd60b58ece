#!/bin/sh
# epx-run: prefixes every line with its rank, fails when a rank fails and stops the others
# at once, and enforces --timeout.   usage: test_launcher.sh EPX_RUN CHILD
set -u
RUN=$1 CHILD=$2
fail() { echo "FAIL: $*"; exit 1; }
out=$("$RUN" -n 3 -- "$CHILD" hello 2>&1) || fail "hello run failed: $out"
for r in 0 1 2; do
  echo "$out" | grep -q "^\[$r\] hello from $r of 3$" || fail "missing prefixed line of rank $r: $out"
  echo "$out" | grep -q "^\[$r\] stderr from $r$" || fail "missing stderr line of rank $r"
  echo "$out" | grep -q "^\[$r\] partial line without newline$" || fail "partial line of rank $r lost"
done
start=$(date +%s)
"$RUN" -n 3 -- "$CHILD" fail1 >/dev/null 2>&1; rc=$?
[ $rc -eq 3 ] || fail "fail1: exit $rc, expected 3"
[ $(( $(date +%s) - start )) -lt 10 ] || fail "fail1: the other ranks were not stopped"
out=$("$RUN" -n 2 -- "$CHILD" kill1 2>/dev/null); rc=$?
[ $rc -eq 137 ] || fail "kill1: exit $rc, expected 137"
nonce=$(echo "$out" | sed -n 's/^\[0\] id epx1:.*:\([0-9a-f]*\)$/\1/p')
[ -n "$nonce" ] || fail "kill1: rank 0 printed no id: $out"
ls /dev/shm | grep -q "^epx-$nonce-" && fail "kill1: shared-memory names left: $(ls /dev/shm | grep "^epx-$nonce")"
start=$(date +%s)
"$RUN" -n 2 --timeout 2 -- "$CHILD" sleep >/dev/null 2>&1; rc=$?
[ $rc -eq 124 ] || fail "timeout: exit $rc, expected 124"
[ $(( $(date +%s) - start )) -lt 10 ] || fail "timeout: ranks not killed in time"
"$RUN" -n 2 -- /nonexistent/program >/dev/null 2>&1; rc=$?
[ $rc -eq 127 ] || fail "missing program: exit $rc, expected 127"
echo "5 passed, 0 failed"
