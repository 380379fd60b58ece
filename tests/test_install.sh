#!/bin/sh
# cmake --install into a scratch prefix, then build and run a program against it twice:
# through find_package(epx) and through pkg-config.   usage: test_install.sh BUILD_DIR SRC_DIR
set -eu
BUILD=$1 SRC=$2 PREFIX=$1/install-test
rm -rf "$PREFIX" "$BUILD/consumer-build"
cmake --install "$BUILD" --prefix "$PREFIX" >/dev/null
cmake -S "$SRC/tests/consumer" -B "$BUILD/consumer-build" -DCMAKE_PREFIX_PATH="$PREFIX" >/dev/null
cmake --build "$BUILD/consumer-build" >/dev/null
"$BUILD/consumer-build/consumer"
LIBDIR=$(ls -d "$PREFIX"/lib*/pkgconfig | head -1)
export PKG_CONFIG_PATH="$LIBDIR"
if command -v pkg-config >/dev/null 2>&1; then
    cc "$SRC/tests/consumer/main.c" -o "$BUILD/consumer-build/consumer-pc" $(pkg-config --cflags --libs epx) \
        -Wl,-rpath,"$(pkg-config --variable=libdir epx)"
    "$BUILD/consumer-build/consumer-pc"
fi
echo "1 passed, 0 failed"
