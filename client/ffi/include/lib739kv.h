/*
 * lib739kv.h - the kv739 C API of replikv (libkv739.so / libkv739.a).
 *
 * A process holds at most one session, from kv739_init to kv739_shutdown. get and put may
 * be called from many threads at once. Every call blocks for at most a deadline
 * (KV739_TIMEOUT_MS, default 10000 ms), retrying on other servers meanwhile; a retried put
 * is applied exactly once and still returns the value it replaced.
 *
 * fork: a child may call kv739_init after the parent's kv739_shutdown, and may go on using
 * a session that was open when it forked: its first call starts a session of the child's
 * own (fresh connections and session id; the parent's is untouched). kv739_shutdown and
 * kv739_init work in the child as anywhere. No call waits for the parent's threads.
 *
 * Keys are 1..MAX_KEY_SIZE bytes and values 0..MAX_VALUE_SIZE bytes of printable ASCII
 * (0x20..0x7e) other than '[' and ']'. A call with an invalid key or value, a NULL pointer,
 * or before kv739_init returns -1 and stores nothing.
 */
#ifndef LIB739KV_H
#define LIB739KV_H

#ifdef __cplusplus
extern "C" {
#endif

#define MAX_KEY_SIZE 128
#define MAX_VALUE_SIZE 2048

/*
 * Starts the session. server_list is a NULL-terminated array of "host:port" strings.
 * Returns 0 once one listed server answered; -1 if the list is empty or malformed, a
 * session is already up, or no server answered within the init deadline
 * (KV739_INIT_TIMEOUT_MS, default 5000 ms).
 */
int kv739_init(char **server_list);

/*
 * Ends the session and frees everything; kv739_init works again afterwards, with the same
 * or other servers. Returns 0, or -1 if no session was up.
 */
int kv739_shutdown(void);

/*
 * Reads key. value must have room for MAX_VALUE_SIZE + 1 bytes.
 * Returns 0 and the NUL-terminated value if the key exists, 1 (value = "") if not, -1 on
 * failure (value = ""). A stored value that is not a valid kv739 value (written by another
 * kind of client) gives -1.
 */
int kv739_get(char *key, char *value);

/*
 * Stores value under key. old_value must have room for MAX_VALUE_SIZE + 1 bytes and may be
 * the same buffer as value.
 * Returns 0 and the previous value in old_value if there was one, 1 (old_value = "") if
 * not, -1 on failure (old_value = ""). If the previous value is not a valid kv739 value
 * (longer than MAX_VALUE_SIZE or not printable ASCII, written by another kind of client),
 * the new value is stored but the call returns -1: old values are never truncated.
 */
int kv739_put(char *key, char *value, char *old_value);

#ifdef __cplusplus
}
#endif

#endif /* LIB739KV_H */
