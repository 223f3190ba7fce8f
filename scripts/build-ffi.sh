#!/usr/bin/env bash
# Builds the kv739 C library (release) and the file-driven driver against it:
#   target/release/libkv739.so   the library (also libkv739.a)
#   target/release/lib739kv.so   the same library under the name course drivers link with
#   target/release/kv739-driver  client/ffi/driver/kv739-driver.c, rpath'd to that directory
# The header is client/ffi/include/lib739kv.h. Honours CARGO_TARGET_DIR and CC.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

cargo build --release -p replikv-ffi

target_dir="${CARGO_TARGET_DIR:-$root/target}"
lib_dir="$(cd "$target_dir/release" && pwd)"

# A copy rather than a symlink, so the directory can be shipped as is.
cp -f "$lib_dir/libkv739.so" "$lib_dir/lib739kv.so"

"${CC:-gcc}" -std=c11 -O2 -Wall -Wextra -Werror \
    -I "$root/client/ffi/include" \
    "$root/client/ffi/driver/kv739-driver.c" \
    -L "$lib_dir" -lkv739 -Wl,-rpath,"$lib_dir" \
    -o "$lib_dir/kv739-driver"

echo "built $lib_dir/libkv739.so, $lib_dir/lib739kv.so and $lib_dir/kv739-driver"
