/*
 * kv739 from many pthreads at once.
 *
 * Phase 1: 8 threads each write, overwrite and read back their own key range at the same
 * time; every return code, old value and value read must be exactly what a single-threaded
 * run would see, and the main thread then reads every key back.
 * Phase 2: the threads keep reading while the main thread calls kv739_shutdown; nothing
 * crashes, calls in flight end with 0 or -1, and any call that starts after kv739_shutdown
 * returned is -1.
 *
 * Usage: threads KEYS_PER_THREAD HOST:PORT...
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "check.h"
#include "lib739kv.h"

#define THREADS 8

static int keys_per_thread;
static atomic_int shutdown_started, shutdown_done;
static atomic_int stop;

static void key_of(char *buf, size_t len, int t, int k) { snprintf(buf, len, "thr%d-key%d", t, k); }

/* Values are long enough to matter and differ per thread, key and round. */
static void value_of(char *buf, size_t len, int t, int k, int round) {
    snprintf(buf, len, "value of thread %d key %d round %d %0200d", t, k, round, k);
}

static void *writer(void *arg) {
    int t = (int)(long)arg;
    char key[64], value[300], expect[300], out[MAX_VALUE_SIZE + 1];
    for (int round = 1; round <= 2; round++) {
        for (int k = 0; k < keys_per_thread; k++) {
            key_of(key, sizeof key, t, k);
            value_of(value, sizeof value, t, k, round);
            int rc = kv739_put(key, value, out);
            if (round == 1) {
                CHECK_RC(rc, 1);
                CHECK_STR(out, "");
            } else {
                CHECK_RC(rc, 0);
                value_of(expect, sizeof expect, t, k, 1);
                CHECK_STR(out, expect);
            }
        }
    }
    for (int k = 0; k < keys_per_thread; k++) {
        key_of(key, sizeof key, t, k);
        value_of(expect, sizeof expect, t, k, 2);
        CHECK_RC(kv739_get(key, out), 0);
        CHECK_STR(out, expect);
    }
    return NULL;
}

static void *reader(void *arg) {
    int t = (int)(long)arg;
    char key[64], out[MAX_VALUE_SIZE + 1];
    for (int k = 0; !atomic_load(&stop); k = (k + 1) % keys_per_thread) {
        int after = atomic_load(&shutdown_done);
        key_of(key, sizeof key, t, k);
        int rc = kv739_get(key, out);
        if (after) {
            CHECK_RC(rc, -1);
        } else if (rc != 0) {
            /* Only the shutdown may make a read of an existing key fail. */
            CHECK_RC(rc, -1);
            CHECK(atomic_load(&shutdown_started));
        }
    }
    return NULL;
}

static void run_threads(void *(*fn)(void *), pthread_t *ids) {
    for (long t = 0; t < THREADS; t++) {
        if (pthread_create(&ids[t], NULL, fn, (void *)t) != 0) {
            perror("pthread_create");
            exit(2);
        }
    }
}

static void join_threads(pthread_t *ids) {
    for (int t = 0; t < THREADS; t++) pthread_join(ids[t], NULL);
}

int main(int argc, char **argv) {
    if (argc < 3 || (keys_per_thread = atoi(argv[1])) < 1) {
        fprintf(stderr, "usage: %s KEYS_PER_THREAD HOST:PORT...\n", argv[0]);
        return 2;
    }
    pthread_t ids[THREADS];
    CHECK_RC(kv739_init(argv + 2), 0);

    run_threads(writer, ids);
    join_threads(ids);

    char key[64], expect[300], out[MAX_VALUE_SIZE + 1];
    for (int t = 0; t < THREADS; t++) {
        for (int k = 0; k < keys_per_thread; k++) {
            key_of(key, sizeof key, t, k);
            value_of(expect, sizeof expect, t, k, 2);
            CHECK_RC(kv739_get(key, out), 0);
            CHECK_STR(out, expect);
        }
    }

    run_threads(reader, ids);
    /* Let the readers get going so the shutdown lands among calls in flight. */
    struct timespec pause = {0, 200 * 1000 * 1000};
    nanosleep(&pause, NULL);
    atomic_store(&shutdown_started, 1);
    CHECK_RC(kv739_shutdown(), 0);
    atomic_store(&shutdown_done, 1);
    nanosleep(&pause, NULL);
    atomic_store(&stop, 1);
    join_threads(ids);

    return finish("threads");
}
