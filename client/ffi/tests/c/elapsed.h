/* A monotonic clock in milliseconds, for the test programs that time calls against their
 * deadlines. Include after defining _POSIX_C_SOURCE (clock_gettime). */
#ifndef KV739_TEST_ELAPSED_H
#define KV739_TEST_ELAPSED_H

#include <time.h>

static long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

#endif
