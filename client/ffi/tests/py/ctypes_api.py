"""The kv739 library from Python through ctypes, the way Python test drivers load it.

Usage: python3 ctypes_api.py LIBRARY HOST:PORT...
Exits 0 and prints "ctypes: all checks passed" when every check holds.
"""

import ctypes
import sys

import kv739

MAX_VALUE_SIZE = 2048


def main(argv):
    lib = kv739.load(argv[1])

    servers = [s.encode() for s in argv[2:]]
    server_list = (ctypes.c_char_p * (len(servers) + 1))(*servers, None)
    buf = ctypes.create_string_buffer(MAX_VALUE_SIZE + 1)
    failures = []

    def check(what, got, want):
        if got != want:
            failures.append(f"{what}: got {got!r}, expected {want!r}")

    check("get before init", lib.kv739_get(b"py-key", buf), -1)
    check("init", lib.kv739_init(server_list), 0)
    check("second init", lib.kv739_init(server_list), -1)

    check("put new", lib.kv739_put(b"py-key", b"one", buf), 1)
    check("old of put new", buf.value, b"")
    check("put again", lib.kv739_put(b"py-key", b"two", buf), 0)
    check("old of put again", buf.value, b"one")
    check("get", lib.kv739_get(b"py-key", buf), 0)
    check("value", buf.value, b"two")
    check("get missing", lib.kv739_get(b"py-missing", buf), 1)
    check("get missing value", buf.value, b"")

    check("put bracket key", lib.kv739_put(b"py[key]", b"x", buf), -1)
    check("put long key", lib.kv739_put(b"k" * 129, b"x", buf), -1)
    check("put long value", lib.kv739_put(b"py-key", b"v" * 2049, buf), -1)
    check("put None key", lib.kv739_put(None, b"x", buf), -1)
    check("get after rejected puts", lib.kv739_get(b"py-key", buf), 0)
    check("value after rejected puts", buf.value, b"two")

    check("shutdown", lib.kv739_shutdown(), 0)
    check("get after shutdown", lib.kv739_get(b"py-key", buf), -1)
    check("re-init", lib.kv739_init(server_list), 0)
    check("get after re-init", lib.kv739_get(b"py-key", buf), 0)
    check("value after re-init", buf.value, b"two")
    check("final shutdown", lib.kv739_shutdown(), 0)

    for failure in failures:
        print(failure, file=sys.stderr)
    print("ctypes: all checks passed" if not failures else f"ctypes: {len(failures)} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
