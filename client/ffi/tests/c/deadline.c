/*
 * With every server down, calls fail with -1 within their deadline instead of hanging.
 *
 * Usage: deadline HOST:PORT...
 * Initialises against a live cluster and stores a key, prints "ready" and waits for a line
 * on stdin (the harness kills every server in between), then times a get, a put, a
 * shutdown and a fresh init against the dead servers. Prints "elapsed_ms <op> <ms>" lines
 * for the harness, which knows the deadlines it set (KV739_TIMEOUT_MS,
 * KV739_INIT_TIMEOUT_MS) and bounds the times.
 */
#define _POSIX_C_SOURCE 200809L

#include "check.h"
#include "elapsed.h"
#include "lib739kv.h"

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s HOST:PORT...\n", argv[0]);
        return 2;
    }
    char **servers = argv + 1;
    char out[MAX_VALUE_SIZE + 1], value[] = "stored before the crash";

    CHECK_RC(kv739_init(servers), 0);
    CHECK_RC(kv739_put("deadline-key", value, out), 1);
    printf("ready\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) {
        fprintf(stderr, "deadline: no go-ahead on stdin\n");
        return 2;
    }

    long t0 = now_ms();
    CHECK_RC(kv739_get("deadline-key", out), -1);
    CHECK_STR(out, "");
    printf("elapsed_ms get %ld\n", now_ms() - t0);

    char later[] = "written while down";
    t0 = now_ms();
    CHECK_RC(kv739_put("deadline-key", later, out), -1);
    CHECK_STR(out, "");
    printf("elapsed_ms put %ld\n", now_ms() - t0);

    t0 = now_ms();
    CHECK_RC(kv739_shutdown(), 0);
    printf("elapsed_ms shutdown %ld\n", now_ms() - t0);

    t0 = now_ms();
    CHECK_RC(kv739_init(servers), -1);
    printf("elapsed_ms init %ld\n", now_ms() - t0);
    CHECK_RC(kv739_shutdown(), -1);

    return finish("deadline");
}
