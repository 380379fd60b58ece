#!/bin/sh
# cmake --install into a scratch prefix, check what the shared library exports, then build and run a program against it: through
# find_package(epx) (the shared and the static library, and the shared one with MPI and
# CUDA out of reach), and through pkg-config (shared, and static with --static).
#   usage: test_install.sh BUILD_DIR SRC_DIR
set -eu
BUILD=$1 SRC=$2 PREFIX=$1/install-test
rm -rf "$PREFIX" "$BUILD/consumer-build" "$BUILD/consumer-static" "$BUILD/consumer-nodeps"
cmake --install "$BUILD" --prefix "$PREFIX" >/dev/null
# The shared library exports the API only: every symbol it defines is epx_*, none epx__*
# (internal, STYLE.md), from the C and the CUDA objects alike; older toolchains add the
# linker's own _init, _fini, _edata, _end, __bss_start.
if command -v nm >/dev/null 2>&1; then
    LIB=$(ls "$PREFIX"/lib*/libepx.so | head -1)
    BAD=$(nm -D --defined-only "$LIB" | awk 'NF == 3 && ($3 !~ /^epx_/ || $3 ~ /^epx__/) &&
        $3 !~ /^(_init|_fini|_edata|_end|__bss_start)$/ {print $2, $3}')
    if [ -n "$BAD" ]; then echo "libepx.so exports non-API symbols:"; echo "$BAD"; exit 1; fi
fi
cmake -S "$SRC/tests/consumer" -B "$BUILD/consumer-build" -DCMAKE_PREFIX_PATH="$PREFIX" >/dev/null
cmake --build "$BUILD/consumer-build" >/dev/null
"$BUILD/consumer-build/consumer"
cmake -S "$SRC/tests/consumer" -B "$BUILD/consumer-static" -DCMAKE_PREFIX_PATH="$PREFIX" -DEPX_TARGET=epx::epx_static \
    >/dev/null
cmake --build "$BUILD/consumer-static" >/dev/null
"$BUILD/consumer-static/consumer"
cmake -S "$SRC/tests/consumer" -B "$BUILD/consumer-nodeps" -DCMAKE_PREFIX_PATH="$PREFIX" \
    -DCMAKE_DISABLE_FIND_PACKAGE_MPI=ON -DCMAKE_DISABLE_FIND_PACKAGE_CUDAToolkit=ON >/dev/null
cmake --build "$BUILD/consumer-nodeps" >/dev/null
"$BUILD/consumer-nodeps/consumer"
LIBDIR=$(ls -d "$PREFIX"/lib*/pkgconfig | head -1)
export PKG_CONFIG_PATH="$LIBDIR"
if command -v pkg-config >/dev/null 2>&1; then
    cc "$SRC/tests/consumer/main.c" -o "$BUILD/consumer-build/consumer-pc" $(pkg-config --cflags --libs epx) \
        -Wl,-rpath,"$(pkg-config --variable=libdir epx)"
    "$BUILD/consumer-build/consumer-pc"
    cc "$SRC/tests/consumer/main.c" -o "$BUILD/consumer-build/consumer-pc-static" $(pkg-config --cflags epx) \
        "$(pkg-config --variable=libdir epx)/libepx.a" $(pkg-config --static --libs epx | sed 's/-lepx//')
    "$BUILD/consumer-build/consumer-pc-static"
fi
echo "1 passed, 0 failed"
