/*
 * kv739 in forked processes: every worker gets a session of its own, and a session open
 * across fork neither hangs the child nor shares its identity with the parent.
 *
 * Usage: fork workers|inherit RUN_TAG HOST:PORT...
 *
 * workers: the parent initialises, writes a key and shuts down, then forks WORKERS
 *   workers; each calls kv739_init with one server of the list and puts KEYS keys of its
 *   own (each new, so each must return 1). After they exit, the parent initialises again
 *   and reads every key back: every put must have been acknowledged and its value stored.
 * inherit: the parent's session stays open while it forks, and a parent thread keeps
 *   writing through it meanwhile. Each child first uses the inherited session (it must
 *   work, on a fresh session of the child's own), then calls kv739_shutdown and
 *   kv739_init itself and works again. The parent keeps using its session during and
 *   after the forks, and reads every child's keys back at the end.
 *
 * Every call is timed: none may take longer than KV739_TIMEOUT_MS (KV739_INIT_TIMEOUT_MS
 * for init) plus SLACK_MS. Each process arms alarm(2) so that a hang kills it rather than
 * leave a stray process behind once the harness has killed the parent.
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "elapsed.h"
#include "lib739kv.h"

#define WORKERS 10
#define KEYS 200
#define CHILD_KEYS 20
/* Scheduling slack on a loaded 2-core machine; a hang blows far past it. */
#define SLACK_MS 3000
/* No process of this program lives longer than this; a child that hangs dies first, so
 * the parent reports it. */
#define ALARM_S 180
#define CHILD_ALARM_S 120

static const char *tag;
static long call_bound_ms, init_bound_ms;

static long env_ms(const char *name, long fallback) {
    const char *v = getenv(name);
    long ms = v ? atol(v) : 0;
    return ms > 0 ? ms : fallback;
}

/* Runs a call, checks that it ended within `bound` ms, and returns its result. */
#define TIMED(call, bound)                                                                  \
    __extension__({                                                                         \
        long t0_ = now_ms();                                                                \
        int rc_ = (call);                                                                   \
        long took_ = now_ms() - t0_;                                                        \
        if (took_ > (bound)) {                                                              \
            fprintf(stderr, "%s:%d: [pid %d] %s took %ld ms (bound %ld ms)\n", __FILE__,    \
                    __LINE__, (int)getpid(), #call, took_, (long)(bound));                   \
            atomic_fetch_add(&check_failures, 1);                                           \
        }                                                                                   \
        rc_;                                                                                \
    })

static void key_of(char *buf, size_t len, const char *who, int w, int k) {
    snprintf(buf, len, "%s-%s%d-key%d", tag, who, w, k);
}

static void value_of(char *buf, size_t len, const char *who, int w, int k) {
    snprintf(buf, len, "value of %s %d key %d in %s", who, w, k, tag);
}

/* Forks one process that runs `body(i)` and exits with its failure count (capped). */
static pid_t spawn(int (*body)(int, char **), int i, char **servers) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(CHILD_ALARM_S);
        int failures = body(i, servers);
        fflush(stdout);
        fflush(stderr);
        _exit(failures > 100 ? 100 : failures);
    }
    CHECK(pid > 0);
    return pid;
}

/* Waits for every child; each must exit 0 (no failed check). */
static void reap(pid_t *pids, int n, const char *what) {
    for (int i = 0; i < n; i++) {
        if (pids[i] <= 0) continue;
        int status = 0;
        CHECK(waitpid(pids[i], &status, 0) == pids[i]);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "%s %d (pid %d) failed: %s %d\n", what, i, (int)pids[i],
                    WIFEXITED(status) ? "exit" : "signal",
                    WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
            atomic_fetch_add(&check_failures, 1);
        }
    }
}

/* Reads back the keys `who` number w wrote; each must hold its value. */
static void read_back(const char *who, int w, int keys) {
    char key[128], want[256], out[MAX_VALUE_SIZE + 1];
    for (int k = 0; k < keys; k++) {
        key_of(key, sizeof key, who, w, k);
        value_of(want, sizeof want, who, w, k);
        CHECK_RC(TIMED(kv739_get(key, out), call_bound_ms), 0);
        CHECK_STR(out, want);
    }
}

/* ---- workers: init + shutdown in the parent, then fresh sessions in every worker ---- */

static int worker(int w, char **servers) {
    int nservers = 0;
    while (servers[nservers]) nservers++;
    char *one[2] = {servers[w % nservers], NULL};
    CHECK_RC(TIMED(kv739_init(one), init_bound_ms), 0);
    char key[128], value[256], out[MAX_VALUE_SIZE + 1];
    int failed = 0, acknowledged = 0;
    for (int k = 0; k < KEYS; k++) {
        key_of(key, sizeof key, "worker", w, k);
        value_of(value, sizeof value, "worker", w, k);
        int rc = TIMED(kv739_put(key, value, out), call_bound_ms);
        if (rc == -1) failed++;
        else acknowledged++;
        CHECK_RC(rc, 1);
        CHECK_STR(out, "");
    }
    CHECK_RC(TIMED(kv739_shutdown(), SLACK_MS), 0);
    printf("worker %d: %d puts acknowledged, %d returned -1\n", w, acknowledged, failed);
    return atomic_load(&check_failures);
}

static void run_workers(char **servers) {
    char out[MAX_VALUE_SIZE + 1], value[] = "written before the fork";
    CHECK_RC(TIMED(kv739_init(servers), init_bound_ms), 0);
    char key[128];
    snprintf(key, sizeof key, "%s-parent", tag);
    CHECK_RC(TIMED(kv739_put(key, value, out), call_bound_ms), 1);
    CHECK_RC(TIMED(kv739_shutdown(), SLACK_MS), 0);

    pid_t pids[WORKERS];
    for (int w = 0; w < WORKERS; w++) pids[w] = spawn(worker, w, servers);
    reap(pids, WORKERS, "worker");

    CHECK_RC(TIMED(kv739_init(servers), init_bound_ms), 0);
    for (int w = 0; w < WORKERS; w++) read_back("worker", w, KEYS);
    CHECK_RC(TIMED(kv739_get(key, out), call_bound_ms), 0);
    CHECK_STR(out, value);
    CHECK_RC(TIMED(kv739_shutdown(), SLACK_MS), 0);
}

/* ---- inherit: the parent's session is open (and busy) while it forks ---- */

static atomic_int stop_writer;
static atomic_int writer_puts;

/* Keeps a put of the parent in flight as often as it can while the parent forks. */
static void *parent_writer(void *arg) {
    (void)arg;
    char key[128], value[256], out[MAX_VALUE_SIZE + 1];
    snprintf(key, sizeof key, "%s-parent-busy", tag);
    while (!atomic_load(&stop_writer)) {
        int n = atomic_fetch_add(&writer_puts, 1);
        snprintf(value, sizeof value, "busy %d", n);
        int rc = TIMED(kv739_put(key, value, out), call_bound_ms);
        CHECK(rc == 0 || (rc == 1 && n == 0));
    }
    return NULL;
}

static void child_puts(const char *who, int c, int from, int to) {
    char key[128], value[256], out[MAX_VALUE_SIZE + 1];
    for (int k = from; k < to; k++) {
        key_of(key, sizeof key, who, c, k);
        value_of(value, sizeof value, who, c, k);
        CHECK_RC(TIMED(kv739_put(key, value, out), call_bound_ms), 1);
        CHECK_STR(out, "");
    }
}

static int inheritor(int c, char **servers) {
    char key[128], out[MAX_VALUE_SIZE + 1];
    /* The inherited session: its first call notices the fork and works on a session of
     * this process's own. */
    child_puts("child", c, 0, CHILD_KEYS / 2);
    snprintf(key, sizeof key, "%s-parent", tag);
    CHECK_RC(TIMED(kv739_get(key, out), call_bound_ms), 0);
    CHECK_STR(out, "written before the fork");
    read_back("child", c, CHILD_KEYS / 2);
    /* It ends like any session, and a fresh one starts. */
    CHECK_RC(TIMED(kv739_shutdown(), SLACK_MS), 0);
    CHECK_RC(kv739_get(key, out), -1);
    CHECK_RC(TIMED(kv739_init(servers), init_bound_ms), 0);
    child_puts("child", c, CHILD_KEYS / 2, CHILD_KEYS);
    read_back("child", c, CHILD_KEYS);
    CHECK_RC(TIMED(kv739_shutdown(), SLACK_MS), 0);
    return atomic_load(&check_failures);
}

static void run_inherit(char **servers) {
    char key[128], out[MAX_VALUE_SIZE + 1], value[] = "written before the fork";
    snprintf(key, sizeof key, "%s-parent", tag);
    CHECK_RC(TIMED(kv739_init(servers), init_bound_ms), 0);
    CHECK_RC(TIMED(kv739_put(key, value, out), call_bound_ms), 1);

    pthread_t writer;
    CHECK(pthread_create(&writer, NULL, parent_writer, NULL) == 0);
    pid_t pids[WORKERS];
    for (int c = 0; c < WORKERS; c++) {
        /* Fork at different points of the writer's calls. */
        int before = atomic_load(&writer_puts);
        for (long t0 = now_ms(); atomic_load(&writer_puts) == before && now_ms() - t0 < 200;)
            sched_yield();
        pids[c] = spawn(inheritor, c, servers);
    }
    /* The parent's session is still its own and still works. */
    child_puts("parent", 0, 0, CHILD_KEYS);
    reap(pids, WORKERS, "child");
    atomic_store(&stop_writer, 1);
    CHECK(pthread_join(writer, NULL) == 0);
    CHECK(atomic_load(&writer_puts) > 0);

    read_back("parent", 0, CHILD_KEYS);
    for (int c = 0; c < WORKERS; c++) read_back("child", c, CHILD_KEYS);
    CHECK_RC(TIMED(kv739_shutdown(), SLACK_MS), 0);
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s workers|inherit RUN_TAG HOST:PORT...\n", argv[0]);
        return 2;
    }
    alarm(ALARM_S);
    tag = argv[2];
    call_bound_ms = env_ms("KV739_TIMEOUT_MS", 10000) + SLACK_MS;
    init_bound_ms = env_ms("KV739_INIT_TIMEOUT_MS", 5000) + SLACK_MS;
    char **servers = argv + 3;
    if (strcmp(argv[1], "workers") == 0) {
        run_workers(servers);
    } else if (strcmp(argv[1], "inherit") == 0) {
        run_inherit(servers);
    } else {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    return finish("fork");
}
