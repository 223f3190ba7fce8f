/*
 * Without valid credentials nothing is read or written, and every call ends within its
 * deadline with -1.
 *
 * Usage: credentials HOST:PORT...
 * Run by the harness with a wrong REPLIKV_TOKEN, or with no user at all. kv739_init may
 * succeed (it opens no session with the servers) or fail; either way a put and a get
 * return -1 and leave the output buffer empty. Prints "elapsed_ms <op> <ms>" lines for the
 * harness, which bounds them by the deadline it set (KV739_TIMEOUT_MS).
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
    char out[MAX_VALUE_SIZE + 1], value[] = "written without credentials";

    long t0 = now_ms();
    int rc = kv739_init(argv + 1);
    printf("elapsed_ms init %ld\n", now_ms() - t0);
    CHECK(rc == 0 || rc == -1);
    if (rc == 0) {
        strcpy(out, "untouched");
        t0 = now_ms();
        CHECK_RC(kv739_put("credentials-key", value, out), -1);
        printf("elapsed_ms put %ld\n", now_ms() - t0);
        CHECK_STR(out, "");

        strcpy(out, "untouched");
        t0 = now_ms();
        CHECK_RC(kv739_get("credentials-key", out), -1);
        printf("elapsed_ms get %ld\n", now_ms() - t0);
        CHECK_STR(out, "");
        CHECK_RC(kv739_shutdown(), 0);
    }
    return finish("credentials");
}
