/*
 * The kv739 contract, call by call, against a live cluster: return codes, old values,
 * argument rejection, NULL pointers, buffer bounds, shutdown and re-init.
 *
 * Usage: api HOST:PORT...   (at least two servers)
 * The harness first stores, through another client, "foreign-long" (a value longer than
 * MAX_VALUE_SIZE) and "foreign-binary" (bytes kv739 may not hold). Keys that must never be
 * stored (the rejected puts) are checked afterwards by the Rust
 * harness through another client, since kv739 itself cannot read an invalid key.
 */
#include <stdlib.h>

#include "check.h"
#include "lib739kv.h"

/* One byte past what the library may write, filled with a sentinel, to catch overruns. */
#define BUF_LEN (MAX_VALUE_SIZE + 2)
#define SENTINEL '#'

static char out[BUF_LEN];

static void reset_out(void) { memset(out, SENTINEL, sizeof out); }

static char *repeat(char c, size_t n) {
    char *s = malloc(n + 1);
    if (!s) {
        perror("malloc");
        exit(2);
    }
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

static void before_init(char **servers) {
    char value[] = "v";
    CHECK_RC(kv739_get("before-init", out), -1);
    CHECK_RC(kv739_put("before-init", value, out), -1);
    CHECK_RC(kv739_shutdown(), -1);

    /* Malformed lists fail at once and leave no session behind. */
    char *empty[] = {NULL};
    char *no_port[] = {"localhost", NULL};
    char *bad_port[] = {"localhost:99999", NULL};
    char *url[] = {"http://localhost:1", NULL};
    char *mixed[] = {servers[0], "not a server", NULL};
    CHECK_RC(kv739_init(NULL), -1);
    CHECK_RC(kv739_init(empty), -1);
    CHECK_RC(kv739_init(no_port), -1);
    CHECK_RC(kv739_init(bad_port), -1);
    CHECK_RC(kv739_init(url), -1);
    CHECK_RC(kv739_init(mixed), -1);
    CHECK_RC(kv739_shutdown(), -1);
}

static void return_codes_and_old_values(void) {
    char v1[] = "first value", v2[] = "second, with comma and spaces ~!@#$%^&*()";

    reset_out();
    CHECK_RC(kv739_put("api-key", v1, out), 1);
    CHECK_STR(out, "");

    reset_out();
    CHECK_RC(kv739_put("api-key", v2, out), 0);
    CHECK_STR(out, v1);

    reset_out();
    CHECK_RC(kv739_get("api-key", out), 0);
    CHECK_STR(out, v2);

    reset_out();
    CHECK_RC(kv739_get("api-missing", out), 1);
    CHECK_STR(out, "");

    /* The empty string is a value, distinct from "no value". */
    char empty[] = "";
    CHECK_RC(kv739_put("api-empty", empty, out), 1);
    reset_out();
    CHECK_RC(kv739_get("api-empty", out), 0);
    CHECK_STR(out, "");
    reset_out();
    CHECK_RC(kv739_put("api-empty", v1, out), 0);
    CHECK_STR(out, "");

    /* value and old_value may be one buffer: the new value is read before the old one is
     * written. */
    char shared[MAX_VALUE_SIZE + 1] = "third";
    CHECK_RC(kv739_put("api-key", shared, shared), 0);
    CHECK_STR(shared, v2);
    CHECK_RC(kv739_get("api-key", out), 0);
    CHECK_STR(out, "third");
}

static void largest_key_and_value(void) {
    char *key = repeat('k', MAX_KEY_SIZE);
    char *value = repeat('v', MAX_VALUE_SIZE);
    char *value2 = repeat('w', MAX_VALUE_SIZE);

    reset_out();
    CHECK_RC(kv739_put(key, value, out), 1);
    reset_out();
    CHECK_RC(kv739_put(key, value2, out), 0);
    CHECK(strlen(out) == MAX_VALUE_SIZE && strcmp(out, value) == 0);
    CHECK(out[MAX_VALUE_SIZE + 1] == SENTINEL);

    reset_out();
    CHECK_RC(kv739_get(key, out), 0);
    CHECK(strlen(out) == MAX_VALUE_SIZE && strcmp(out, value2) == 0);
    CHECK(out[MAX_VALUE_SIZE + 1] == SENTINEL);

    free(key);
    free(value);
    free(value2);
}

static void invalid_arguments_store_nothing(void) {
    char ok_value[] = "fine";
    char *long_key = repeat('k', MAX_KEY_SIZE + 1);
    char *long_value = repeat('v', MAX_VALUE_SIZE + 1);
    char *bad_keys[] = {"", "api[open", "api]close", long_key, "api\ttab", "api\nnewline",
                        "api\x7f" "del", "api\xc3\xa9", "api\x01"};
    char *bad_values[] = {long_value, "[bracketed]", "tab\there", "new\nline", "bell\a",
                          "high\xff"};

    for (size_t i = 0; i < sizeof bad_keys / sizeof *bad_keys; i++) {
        reset_out();
        CHECK_RC(kv739_put(bad_keys[i], ok_value, out), -1);
        CHECK_STR(out, "");
        CHECK_RC(kv739_get(bad_keys[i], out), -1);
    }
    for (size_t i = 0; i < sizeof bad_values / sizeof *bad_values; i++) {
        /* On a fresh key: still absent afterwards. */
        CHECK_RC(kv739_put("api-bad-value", bad_values[i], out), -1);
        CHECK_RC(kv739_get("api-bad-value", out), 1);
        /* On an existing key: the old value survives. */
        CHECK_RC(kv739_put("api-key", bad_values[i], out), -1);
        CHECK_RC(kv739_get("api-key", out), 0);
        CHECK_STR(out, "third");
    }

    /* NULL anywhere is -1 and stores nothing. */
    CHECK_RC(kv739_get(NULL, out), -1);
    CHECK_RC(kv739_get("api-key", NULL), -1);
    CHECK_RC(kv739_put(NULL, ok_value, out), -1);
    CHECK_RC(kv739_put("api-null", NULL, out), -1);
    CHECK_RC(kv739_put("api-null", ok_value, NULL), -1);
    CHECK_RC(kv739_get("api-null", out), 1);

    free(long_key);
    free(long_value);
}

/* Values kv739 cannot return are -1, never truncated or passed through; a put over them
 * still stores its new value. */
static void foreign_values(void) {
    char *keys[] = {"foreign-long", "foreign-binary"};
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++) {
        reset_out();
        CHECK_RC(kv739_get(keys[i], out), -1);
        CHECK_STR(out, "");
        CHECK(out[MAX_VALUE_SIZE + 1] == SENTINEL);

        char replacement[] = "replaced by kv739";
        reset_out();
        CHECK_RC(kv739_put(keys[i], replacement, out), -1);
        CHECK_STR(out, "");
        CHECK(out[MAX_VALUE_SIZE + 1] == SENTINEL);

        CHECK_RC(kv739_get(keys[i], out), 0);
        CHECK_STR(out, replacement);
    }
}

static void shutdown_and_reinit(char **servers) {
    CHECK_RC(kv739_init(servers), -1); /* already initialised */
    CHECK_RC(kv739_shutdown(), 0);
    CHECK_RC(kv739_shutdown(), -1);
    char value[] = "after shutdown";
    CHECK_RC(kv739_get("api-key", out), -1);
    CHECK_RC(kv739_put("api-after-shutdown", value, out), -1);

    /* Same servers again: the data is still there. */
    CHECK_RC(kv739_init(servers), 0);
    reset_out();
    CHECK_RC(kv739_get("api-key", out), 0);
    CHECK_STR(out, "third");
    CHECK_RC(kv739_get("api-after-shutdown", out), 1);
    CHECK_RC(kv739_shutdown(), 0);

    /* Other servers (only the second one, listed twice): one replica is enough to talk
     * to, and a repeated entry is not an error. */
    char *second[] = {servers[1], servers[1], NULL};
    CHECK_RC(kv739_init(second), 0);
    reset_out();
    char fourth[] = "fourth";
    CHECK_RC(kv739_put("api-key", fourth, out), 0);
    CHECK_STR(out, "third");
    CHECK_RC(kv739_get("api-key", out), 0);
    CHECK_STR(out, "fourth");
    CHECK_RC(kv739_shutdown(), 0);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s HOST:PORT HOST:PORT...\n", argv[0]);
        return 2;
    }
    /* argv is NULL-terminated by the C standard, so argv + 1 is a kv739 server list. */
    char **servers = argv + 1;

    before_init(servers);
    CHECK_RC(kv739_init(servers), 0);
    return_codes_and_old_values();
    largest_key_and_value();
    invalid_arguments_store_nothing();
    foreign_values();
    shutdown_and_reinit(servers);
    return finish("api");
}
