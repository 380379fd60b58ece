#!/bin/sh
# epx-run: prefixes every line with its rank, fails when a rank fails and stops the others
# at once, and enforces --timeout; ranks inherit none of the launcher's pipes, and a SIGTERM
# to the launcher stops the ranks too.   usage: test_launcher.sh EPX_RUN CHILD
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
# Every rank starts with the same fds: rank r holds no read end of the pipes of ranks < r.
out=$("$RUN" -n 3 -- sh -c 'ls /proc/self/fd | wc -l' 2>&1) || fail "fd count run failed: $out"
[ "$(echo "$out" | sed 's/^\[[0-9]*\] //' | sort -u | wc -l)" -eq 1 ] ||
  fail "ranks start with different numbers of open fds (the launcher's pipes leaked into them): $out"
# SIGTERM (or a Ctrl-C's SIGINT) to the launcher stops the ranks, which run in process groups
# of their own, and the launcher exits 128 + 15.
tmp=$(mktemp)
"$RUN" -n 2 -- sh -c 'echo pid $$; exec sleep 60' >"$tmp" 2>&1 &
L=$!
i=0
while [ "$(grep -c ' pid ' "$tmp")" -lt 2 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
pids=$(sed -n 's/^\[[0-9]*\] pid \([0-9]*\)$/\1/p' "$tmp")
kill -TERM $L
wait $L; rc=$?
rm -f "$tmp"
[ $rc -eq 143 ] || fail "SIGTERM to epx-run: exit $rc, expected 143"
i=0
for p in $pids; do
  while kill -0 "$p" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  kill -0 "$p" 2>/dev/null && { kill -KILL $pids 2>/dev/null; fail "rank process $p still runs after SIGTERM to epx-run"; }
done
echo "7 passed, 0 failed"
