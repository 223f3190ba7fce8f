/*
 * The nemesis' forked workload: kv739 in several processes while faults are injected.
 *
 * Usage: forked run LIBRARY DIR WORKERS SECONDS HOST:PORT...
 *        forked verify LIBRARY DIR WORKERS HOST:PORT...
 *
 * run: loads LIBRARY (libkv739.so) with dlopen, calls kv739_init and kv739_shutdown in
 *   the parent, then forks WORKERS workers. Each calls kv739_init with every server and
 *   puts fresh keys of its own for SECONDS seconds, whatever the nemesis does meanwhile.
 *   Every put that returns 1 (acknowledged; the key was new) is appended to
 *   DIR/acks-<worker>.txt as "key<TAB>value" before the next put starts. A put that
 *   returns 0 found an old value under a fresh key (a write applied twice, or state from
 *   nowhere) and fails the run; -1 (not acknowledged) is allowed under faults. A worker
 *   with no acknowledged put at all fails too: it proved nothing.
 * verify: forks one reader per server; each calls kv739_init with that server alone and
 *   reads every acknowledged key back: each must hold exactly its value.
 *
 * Every call is timed: none may take longer than KV739_TIMEOUT_MS (KV739_INIT_TIMEOUT_MS
 * for init) plus SLACK_MS; a call that hangs also trips alarm(2), so no process outlives
 * its bound. Prints "forked: all checks passed" and exits 0 when every check holds.
 */
#define _POSIX_C_SOURCE 200809L

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "lib739kv.h"

/* Scheduling slack on a loaded machine (servers, clients and workers share the cores); a
 * hang blows far past it. */
#define SLACK_MS 3000
/* A worker or reader that outlives its work by this much is killed by alarm(2). */
#define ALARM_MARGIN_S 120
#define MAX_WORKERS 64
#define MAX_LINE (MAX_KEY_SIZE + MAX_VALUE_SIZE + 4)

static __typeof__(kv739_init) *init_fn;
static __typeof__(kv739_shutdown) *shutdown_fn;
static __typeof__(kv739_get) *get_fn;
static __typeof__(kv739_put) *put_fn;

static long call_bound_ms, init_bound_ms;
static int failures;
static long slowest_ms;

static long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static long env_ms(const char *name, long fallback) {
    const char *v = getenv(name);
    long ms = v ? atol(v) : 0;
    return ms > 0 ? ms : fallback;
}

static void fail(const char *what, const char *detail) {
    fprintf(stderr, "[pid %d] %s: %s\n", (int)getpid(), what, detail);
    failures++;
}

/* Runs a call, checks that it ended within `bound` ms, and returns its result. */
#define TIMED(what, call, bound)                                                            \
    __extension__({                                                                         \
        long t0_ = now_ms();                                                                \
        int rc_ = (call);                                                                   \
        long took_ = now_ms() - t0_;                                                        \
        if (took_ > slowest_ms) slowest_ms = took_;                                         \
        if (took_ > (bound)) {                                                              \
            char msg_[96];                                                                  \
            snprintf(msg_, sizeof msg_, "took %ld ms (bound %ld ms)", took_, (long)(bound)); \
            fail(what, msg_);                                                               \
        }                                                                                   \
        rc_;                                                                                \
    })

static void load(const char *path) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "cannot load %s: %s\n", path, dlerror());
        exit(2);
    }
    /* POSIX guarantees that a data pointer from dlsym converts to a function pointer. */
    *(void **)&init_fn = dlsym(lib, "kv739_init");
    *(void **)&shutdown_fn = dlsym(lib, "kv739_shutdown");
    *(void **)&get_fn = dlsym(lib, "kv739_get");
    *(void **)&put_fn = dlsym(lib, "kv739_put");
    if (!init_fn || !shutdown_fn || !get_fn || !put_fn) {
        fprintf(stderr, "%s lacks a kv739 function\n", path);
        exit(2);
    }
}

static void ack_path(char *buf, size_t len, const char *dir, int w) {
    snprintf(buf, len, "%s/acks-%d.txt", dir, w);
}

/* kv739_init until it succeeds or `until` (ms) passes: no listed server may answer while
 * the nemesis holds them all down. Each attempt must keep its deadline. */
static int init_until(char **servers, long until) {
    for (;;) {
        if (TIMED("kv739_init", init_fn(servers), init_bound_ms) == 0) return 0;
        if (now_ms() >= until) return -1;
        struct timespec pause = {0, 100 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
}

static int worker(int w, const char *dir, long until, char **servers) {
    char path[4096];
    ack_path(path, sizeof path, dir, w);
    FILE *acks = fopen(path, "w");
    if (!acks) {
        fail("open the acknowledgement file", strerror(errno));
        return failures;
    }
    if (init_until(servers, until) != 0) {
        fail("kv739_init", "no server answered during the whole run");
        fclose(acks);
        return failures;
    }
    char key[MAX_KEY_SIZE + 1], value[MAX_VALUE_SIZE + 1], out[MAX_VALUE_SIZE + 1];
    long acked = 0, refused = 0;
    for (long i = 0; now_ms() < until; i++) {
        snprintf(key, sizeof key, "fw%d-%ld", w, i);
        snprintf(value, sizeof value, "forked worker %d write %ld", w, i);
        int rc = TIMED("kv739_put", put_fn(key, value, out), call_bound_ms);
        if (rc == 1) {
            /* Recorded before the next put starts: every line names an acknowledged write. */
            fprintf(acks, "%s\t%s\n", key, value);
            fflush(acks);
            acked++;
            if (out[0] != '\0') fail(key, "acknowledged as new but returned an old value");
        } else if (rc == 0) {
            char msg[MAX_VALUE_SIZE + 64];
            snprintf(msg, sizeof msg, "a fresh key returned the old value \"%.80s\"", out);
            fail(key, msg);
        } else {
            refused++;
        }
    }
    fclose(acks);
    TIMED("kv739_shutdown", shutdown_fn(), (long)SLACK_MS);
    if (acked == 0) fail("worker", "no put was acknowledged during the whole run");
    /* key=value, so that the nemesis can add the numbers up. */
    printf("forked worker %d: acknowledged=%ld refused=%ld slowest_ms=%ld\n", w, acked, refused,
           slowest_ms);
    return failures;
}

static int reader(int rank, const char *dir, int workers, char **servers) {
    char *one[2] = {servers[rank], NULL};
    if (TIMED("kv739_init", init_fn(one), init_bound_ms) != 0) {
        fail(servers[rank], "kv739_init failed");
        return failures;
    }
    char line[MAX_LINE], out[MAX_VALUE_SIZE + 1], path[4096];
    long checked = 0;
    for (int w = 0; w < workers; w++) {
        ack_path(path, sizeof path, dir, w);
        FILE *acks = fopen(path, "r");
        if (!acks) {
            fail(path, strerror(errno));
            continue;
        }
        while (fgets(line, sizeof line, acks)) {
            line[strcspn(line, "\n")] = '\0';
            char *tab = strchr(line, '\t');
            if (!tab) {
                fail(path, "a line without a tab");
                continue;
            }
            *tab = '\0';
            const char *key = line, *want = tab + 1;
            int rc = TIMED("kv739_get", get_fn((char *)key, out), call_bound_ms);
            checked++;
            if (rc != 0 || strcmp(out, want) != 0) {
                char msg[2 * MAX_VALUE_SIZE];
                snprintf(msg, sizeof msg,
                         "acknowledged with \"%.80s\", server %s answered %d \"%.80s\"", want,
                         servers[rank], rc, out);
                fail(key, msg);
            }
        }
        fclose(acks);
    }
    TIMED("kv739_shutdown", shutdown_fn(), (long)SLACK_MS);
    printf("forked reader of %s: %ld acknowledged writes read, %d failed checks, slowest call "
           "%ld ms\n",
           servers[rank], checked, failures, slowest_ms);
    return failures;
}

/* Lines in every worker's acknowledgement file. */
static long count_acks(const char *dir, int workers) {
    char line[MAX_LINE], path[4096];
    long lines = 0;
    for (int w = 0; w < workers; w++) {
        ack_path(path, sizeof path, dir, w);
        FILE *acks = fopen(path, "r");
        if (!acks) continue;
        while (fgets(line, sizeof line, acks)) lines++;
        fclose(acks);
    }
    return lines;
}

/* Waits for every child; each must exit 0 (no failed check). */
static void reap(pid_t *pids, int n, const char *what) {
    for (int i = 0; i < n; i++) {
        int status = 0;
        if (waitpid(pids[i], &status, 0) != pids[i]) {
            fail(what, "waitpid failed");
        } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "%s %d (pid %d) failed: %s %d\n", what, i, (int)pids[i],
                    WIFEXITED(status) ? "exit" : "signal",
                    WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
            failures++;
        }
    }
}

static pid_t spawn(unsigned alarm_s) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(2);
    }
    if (pid == 0) alarm(alarm_s);
    return pid;
}

static int finish(void) {
    if (failures == 0) {
        printf("forked: all checks passed\n");
        return 0;
    }
    printf("forked: %d checks failed\n", failures);
    return 1;
}

int main(int argc, char **argv) {
    const char *usage = "usage: forked run LIBRARY DIR WORKERS SECONDS HOST:PORT...\n"
                        "       forked verify LIBRARY DIR WORKERS HOST:PORT...\n";
    int run = argc >= 7 && strcmp(argv[1], "run") == 0;
    int verify = argc >= 6 && strcmp(argv[1], "verify") == 0;
    if (!run && !verify) {
        fputs(usage, stderr);
        return 2;
    }
    load(argv[2]);
    const char *dir = argv[3];
    int workers = atoi(argv[4]);
    if (workers < 1 || workers > MAX_WORKERS) {
        fprintf(stderr, "WORKERS must be 1..%d\n", MAX_WORKERS);
        return 2;
    }
    call_bound_ms = env_ms("KV739_TIMEOUT_MS", 10000) + SLACK_MS;
    init_bound_ms = env_ms("KV739_INIT_TIMEOUT_MS", 5000) + SLACK_MS;
    pid_t pids[MAX_WORKERS];

    if (run) {
        long seconds = atol(argv[5]);
        char **servers = argv + 6;
        long until = now_ms() + seconds * 1000;
        alarm((unsigned)(seconds + 2 * ALARM_MARGIN_S));
        /* A session in the parent, ended before the fork, as a host that probes the
         * cluster and then forks its workers does: each worker's session must be its own
         * (lib739kv.h, "fork"). */
        if (init_until(servers, until) != 0) {
            fail("parent kv739_init", "no server answered");
            return finish();
        }
        TIMED("parent kv739_shutdown", shutdown_fn(), (long)SLACK_MS);
        for (int w = 0; w < workers; w++) {
            pids[w] = spawn((unsigned)(seconds + ALARM_MARGIN_S));
            if (pids[w] == 0) {
                failures = 0;
                int f = worker(w, dir, until, servers);
                fflush(stdout);
                fflush(stderr);
                _exit(f > 100 ? 100 : f);
            }
        }
        reap(pids, workers, "worker");
        return finish();
    }

    char **servers = argv + 5;
    int nservers = 0;
    while (servers[nservers] && nservers < MAX_WORKERS) nservers++;
    /* A reader's alarm grows with the writes it reads back: 20 ms each on average, far
     * above what a healthy server needs. */
    unsigned reader_alarm = ALARM_MARGIN_S + (unsigned)(count_acks(dir, workers) / 50);
    alarm(2 * reader_alarm);
    for (int r = 0; r < nservers; r++) {
        pids[r] = spawn(reader_alarm);
        if (pids[r] == 0) {
            failures = 0;
            int f = reader(r, dir, workers, servers);
            fflush(stdout);
            fflush(stderr);
            _exit(f > 100 ? 100 : f);
        }
    }
    reap(pids, nservers, "reader");
    return finish();
}
