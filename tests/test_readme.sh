#!/bin/sh
# The C program of README.md's "Using it", compiled against this build and run on 3 ranks
# under epx-run, and alone (where it must fail with a message, not crash), so that the
# README's example keeps working.   usage: test_readme.sh BUILD_DIR SRC_DIR
set -eu
BUILD=$1 SRC=$2 OUT=$1/readme-example
mkdir -p "$OUT"
awk '/^## Using it/ { on = 1; next } on && /^```c$/ { code = 1; next } code && /^```$/ { exit } code' \
    "$SRC/README.md" >"$OUT/example.c"
grep -q 'int main' "$OUT/example.c" || { echo "README.md: no C program under \"Using it\""; exit 1; }
cc -std=c11 -Wall -Wextra -Werror -I"$SRC/include" "$OUT/example.c" -o "$OUT/example" -L"$BUILD/lib" -lepx \
    -Wl,-rpath,"$BUILD/lib"
"$BUILD/bin/epx-run" -n 3 --timeout 60 -- "$OUT/example"
if "$OUT/example" 2>"$OUT/alone.txt"; then
    echo "the example succeeded outside epx-run"
    exit 1
fi
grep -q "epx-run" "$OUT/alone.txt" || { echo "outside epx-run, no useful message:"; cat "$OUT/alone.txt"; exit 1; }
echo "1 passed, 0 failed"
