/* Tiny assertion helpers shared by the C test programs: a failed CHECK reports where and
 * why, and the program keeps going so one run shows every broken rule. */
#ifndef KV739_TEST_CHECK_H
#define KV739_TEST_CHECK_H

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

static atomic_int check_failures;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
            atomic_fetch_add(&check_failures, 1);                                      \
        }                                                                              \
    } while (0)

/* Compares a return code, printing both sides on a mismatch. */
#define CHECK_RC(call, want)                                                           \
    do {                                                                               \
        int got_ = (call);                                                             \
        if (got_ != (want)) {                                                          \
            fprintf(stderr, "%s:%d: %s returned %d, expected %d\n", __FILE__, __LINE__,  \
                    #call, got_, (want));                                              \
            atomic_fetch_add(&check_failures, 1);                                      \
        }                                                                              \
    } while (0)

/* Compares C strings, printing both on a mismatch (truncated to keep logs readable). */
#define CHECK_STR(got, want)                                                           \
    do {                                                                               \
        const char *g_ = (got), *w_ = (want);                                          \
        if (strcmp(g_, w_) != 0) {                                                     \
            fprintf(stderr, "%s:%d: %s is \"%.80s\", expected \"%.80s\"\n", __FILE__,    \
                    __LINE__, #got, g_, w_);                                           \
            atomic_fetch_add(&check_failures, 1);                                      \
        }                                                                              \
    } while (0)

/* Prints the verdict line the Rust harness looks for and returns the exit status. */
static int finish(const char *name) {
    int failures = atomic_load(&check_failures);
    if (failures == 0) {
        printf("%s: all checks passed\n", name);
        return 0;
    }
    printf("%s: %d checks failed\n", name, failures);
    return 1;
}

#endif
