/*
 * kv739-driver: runs a file of kv739 operations and records each result and its latency.
 *
 * Usage: kv739-driver INPUT OUTPUT
 *
 * INPUT, one operation per line (blank lines and lines starting with '#' are skipped and
 * produce no output):
 *   init,<base_port>,<count>         servers localhost:<base_port> .. <base_port+count-1>
 *   init,<host:port>,<host:port>,... explicit server list
 *   get,<key>
 *   put,<key>,<value>                the value is everything after the second comma
 *   shutdown
 * Keys in an input file cannot contain ','; values can, but then OUTPUT is ambiguous
 * (scripts/gen_input.py never writes commas).
 *
 * OUTPUT, exactly one line per operation, in input order; <rc> is the library's return
 * code and <latency_us> the call's wall-clock duration in microseconds (CLOCK_MONOTONIC):
 *   init, shutdown:  <rc>,<latency_us>
 *   get:             <rc>,<key>,<value>,<latency_us>       value is "" unless rc == 0
 *   put:             <rc>,<key>,<new>,<old>,<latency_us>   old is "" unless rc == 0
 *   anything else:   -1,0                                  (and a warning on stderr)
 * followed by one summary line over the get and put calls (also printed to stdout):
 *   # ops=<n> errors=<n rc==-1> wall_s=<s> throughput_ops_s=<ops/s> p50_us=<us> p99_us=<us>
 * wall_s runs from the first operation to the last, init and shutdown included; the
 * latency percentiles are nearest-rank over get and put only.
 *
 * Exit status: 0 when every line was run (whatever the return codes), 2 on a usage or I/O
 * error. A session still open at the end of the file is shut down (not recorded).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lib739kv.h"

/* Upper bound on servers in one init line; far more than any test cluster. */
#define MAX_INIT_SERVERS 256
/* "localhost:" plus a 5-digit port plus NUL. */
#define HOSTPORT_LEN 32

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Latencies of get/put calls, kept for the percentiles. */
struct latencies {
    uint64_t *v;
    size_t len, cap;
};

static int lat_push(struct latencies *l, uint64_t us) {
    if (l->len == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 1024;
        uint64_t *v = realloc(l->v, cap * sizeof *v);
        if (!v) return -1;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->len++] = us;
    return 0;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile (ceil(p% of n)-th smallest) of sorted values; 0 if none. */
static uint64_t percentile(const struct latencies *l, size_t p) {
    if (l->len == 0) return 0;
    size_t rank = (p * l->len + 99) / 100;
    if (rank < 1) rank = 1;
    return l->v[rank - 1];
}

static int all_digits(const char *s) {
    if (!*s) return 0;
    for (; *s; s++)
        if (*s < '0' || *s > '9') return 0;
    return 1;
}

/*
 * Runs an init line's argument list (the text after "init,", modified in place).
 * Returns the library's rc, or -2 if the line is malformed (nothing was called).
 */
static int run_init(char *args, uint64_t *lat) {
    static char ports[MAX_INIT_SERVERS][HOSTPORT_LEN];
    char *servers[MAX_INIT_SERVERS + 1];
    size_t n = 0;

    char *comma = strchr(args, ',');
    if (comma && !strchr(comma + 1, ',')) {
        *comma = '\0';
        if (all_digits(args) && all_digits(comma + 1)) {
            long base = strtol(args, NULL, 10), count = strtol(comma + 1, NULL, 10);
            if (base < 1 || count < 1 || count > MAX_INIT_SERVERS || base + count - 1 > 65535)
                return -2;
            for (long i = 0; i < count; i++) {
                snprintf(ports[i], HOSTPORT_LEN, "localhost:%ld", base + i);
                servers[n++] = ports[i];
            }
        } else {
            *comma = ',';
        }
    }
    if (n == 0) {
        /* An explicit list: hand every entry to the library, which judges its form. */
        for (char *tok = args; tok; ) {
            if (n == MAX_INIT_SERVERS) return -2;
            char *next = strchr(tok, ',');
            if (next) *next++ = '\0';
            servers[n++] = tok;
            tok = next;
        }
    }
    servers[n] = NULL;
    uint64_t t0 = now_us();
    int rc = kv739_init(servers);
    *lat = now_us() - t0;
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s INPUT OUTPUT\n", argv[0]);
        return 2;
    }
    FILE *in = fopen(argv[1], "r");
    if (!in) {
        fprintf(stderr, "%s: cannot open %s: %s\n", argv[0], argv[1], strerror(errno));
        return 2;
    }
    FILE *out = fopen(argv[2], "w");
    if (!out) {
        fprintf(stderr, "%s: cannot create %s: %s\n", argv[0], argv[2], strerror(errno));
        fclose(in);
        return 2;
    }
    /* Line buffered, so a run can be watched (and a fault injected) while it is going;
     * the write happens outside the timed call. */
    setvbuf(out, NULL, _IOLBF, 0);

    struct latencies lat = {0};
    /* Room for the longest value the library can return, plus its NUL. */
    static char old[MAX_VALUE_SIZE + 1], value[MAX_VALUE_SIZE + 1];
    char *line = NULL;
    size_t line_cap = 0;
    ssize_t got;
    unsigned long lineno = 0, ops = 0, errors = 0;
    int session = 0, status = 0;
    uint64_t first = 0, last = 0;

    while ((got = getline(&line, &line_cap, in)) != -1) {
        lineno++;
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = '\0';
        if (got == 0 || line[0] == '#') continue;
        if (first == 0) first = now_us();

        uint64_t us = 0;
        int rc;
        if (strncmp(line, "init,", 5) == 0) {
            rc = run_init(line + 5, &us);
            if (rc == -2) goto malformed;
            if (rc == 0) session = 1;
            fprintf(out, "%d,%llu\n", rc, (unsigned long long)us);
        } else if (strcmp(line, "shutdown") == 0) {
            uint64_t t0 = now_us();
            rc = kv739_shutdown();
            us = now_us() - t0;
            if (rc == 0) session = 0;
            fprintf(out, "%d,%llu\n", rc, (unsigned long long)us);
        } else if (strncmp(line, "get,", 4) == 0) {
            char *key = line + 4;
            uint64_t t0 = now_us();
            rc = kv739_get(key, value);
            us = now_us() - t0;
            fprintf(out, "%d,%s,%s,%llu\n", rc, key, rc == 0 ? value : "",
                    (unsigned long long)us);
        } else if (strncmp(line, "put,", 4) == 0 && strchr(line + 4, ',')) {
            char *key = line + 4;
            char *val = strchr(key, ',');
            *val++ = '\0';
            uint64_t t0 = now_us();
            rc = kv739_put(key, val, old);
            us = now_us() - t0;
            fprintf(out, "%d,%s,%s,%s,%llu\n", rc, key, val, rc == 0 ? old : "",
                    (unsigned long long)us);
        } else {
            goto malformed;
        }
        if (line[0] == 'g' || line[0] == 'p') {
            ops++;
            if (rc == -1) errors++;
            if (lat_push(&lat, us) != 0) {
                fprintf(stderr, "%s: out of memory\n", argv[0]);
                status = 2;
                break;
            }
        }
        last = now_us();
        continue;

    malformed:
        fprintf(stderr, "%s: %s:%lu: malformed line\n", argv[0], argv[1], lineno);
        fprintf(out, "-1,0\n");
        last = now_us();
    }
    if (ferror(in)) {
        fprintf(stderr, "%s: reading %s: %s\n", argv[0], argv[1], strerror(errno));
        status = 2;
    }
    free(line);
    fclose(in);
    if (session) kv739_shutdown();

    qsort(lat.v, lat.len, sizeof *lat.v, cmp_u64);
    double wall = first ? (double)(last - first) / 1e6 : 0.0;
    char summary[256];
    snprintf(summary, sizeof summary,
             "# ops=%lu errors=%lu wall_s=%.3f throughput_ops_s=%.1f p50_us=%llu p99_us=%llu\n",
             ops, errors, wall, wall > 0 ? (double)ops / wall : 0.0,
             (unsigned long long)percentile(&lat, 50), (unsigned long long)percentile(&lat, 99));
    fputs(summary, out);
    fputs(summary, stdout);
    free(lat.v);
    if (fclose(out) != 0) {
        fprintf(stderr, "%s: writing %s: %s\n", argv[0], argv[2], strerror(errno));
        status = 2;
    }
    return status;
}
