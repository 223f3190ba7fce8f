/*
 * A C++ driver given one server keeps working after that server dies.
 *
 * Usage: one_address HOST:PORT
 * Compiled with g++ against the header named by KV739_HEADER ("kv739.h" or "739kv.h").
 * Initialises with the one server, stores a key, prints "ready" and waits for a line on
 * stdin (the harness kills that server in between), then writes and reads through the
 * servers it learned from the first. Prints "one_address: all checks passed" or what
 * failed.
 */
#include <cstdio>
#include <cstring>
#include <string>

#include KV739_HEADER

static int failures = 0;

static void check(bool ok, const char *what) {
    if (!ok) {
        std::fprintf(stderr, "one_address: %s\n", what);
        failures++;
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s HOST:PORT\n", argv[0]);
        return 2;
    }
    char *servers[] = {argv[1], nullptr};
    char out[MAX_VALUE_SIZE + 1];
    std::string key = "one-address-key", before = "stored before the kill";

    check(kv739_init(servers) == 0, "kv739_init with one server failed");
    check(kv739_put(&key[0], &before[0], out) == 1, "the first put found an old value");
    std::printf("ready\n");
    std::fflush(stdout);
    char line[16];
    if (!std::fgets(line, sizeof line, stdin)) {
        std::fprintf(stderr, "one_address: no go-ahead on stdin\n");
        return 2;
    }

    check(kv739_get(&key[0], out) == 0 && before == out,
          "the value stored before the kill did not read back");
    std::string after = "stored after the kill";
    check(kv739_put(&key[0], &after[0], out) == 0 && before == out,
          "the put after the kill did not return the old value");
    check(kv739_get(&key[0], out) == 0 && after == out,
          "the value stored after the kill did not read back");
    check(kv739_shutdown() == 0, "kv739_shutdown failed");

    if (failures == 0) {
        std::printf("one_address: all checks passed\n");
        return 0;
    }
    std::printf("one_address: %d check(s) failed\n", failures);
    return 1;
}
