/*
 * mod-example: a valvulad module in C, built against include/valvula/module.h only.
 *
 *   cc -std=c99 -Wall -Wextra -pedantic -shared -fPIC -I include \
 *      -o mod_example.so examples/c/mod_example.c
 *
 * It rejects mail from one sender given in its configuration:
 *
 *   [server]
 *   modules = ["/path/to/mod_example.so"]
 *   [[listener]]
 *   address = "127.0.0.1:3579"
 *   modules = ["mod-example"]
 *   [module.mod-example]
 *   blocked_sender = "spammer@example.com"
 *
 * and answers DUNNO to everything else.
 *
 * Threads: process() runs on several threads at once, and reconf() (SIGHUP) may run
 * while they do. So the configuration is read under a read-write lock: process()
 * holds it for reading while it compares, reconf() reads the new value into a buffer
 * of its own first and holds the lock for writing only to copy it in. (Rewriting
 * st->blocked in place while process() reads it would be a data race.)
 */
#define _POSIX_C_SOURCE 200809L /* pthread_rwlock_t under -std=c99 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <valvula/module.h>

struct state {
    const vlv_host_api *host;
    vlv_module_ctx *ctx;
    pthread_rwlock_t lock; /* guards blocked and blocked_len */
    char blocked[256];
    size_t blocked_len;
};

static void say(struct state *st, uint32_t level, const char *text) {
    vlv_str s;
    s.ptr = text;
    s.len = strlen(text);
    st->host->log(st->ctx, level, s);
}

/* Reads blocked_sender from the configuration (missing = block nobody). On an error
 * the value in use stays. */
static int32_t load_config(struct state *st) {
    vlv_str key = VLV_STR("blocked_sender");
    char fresh[sizeof st->blocked];
    size_t len = 0;
    int32_t rc = st->host->config_get(st->ctx, key, fresh, sizeof fresh, &len);
    if (rc == VLV_E_NOT_FOUND) {
        len = 0;
    } else if (rc != VLV_OK) {
        say(st, VLV_LOG_ERROR, "blocked_sender is longer than 255 bytes");
        return rc;
    }
    pthread_rwlock_wrlock(&st->lock);
    memcpy(st->blocked, fresh, len);
    st->blocked_len = len;
    pthread_rwlock_unlock(&st->lock);
    return VLV_OK;
}

static int32_t example_init(const vlv_host_api *host, vlv_module_ctx *ctx, void **state) {
    struct state *st;
    int32_t rc;
    if (!VLV_HAS(host, vlv_host_api, now)) {
        return VLV_E_FAILED; /* a host older than ABI 0.1 */
    }
    st = (struct state *)calloc(1, sizeof *st);
    if (st == NULL) {
        return VLV_E_FAILED;
    }
    st->host = host;
    st->ctx = ctx;
    if (pthread_rwlock_init(&st->lock, NULL) != 0) {
        free(st);
        return VLV_E_FAILED;
    }
    rc = load_config(st);
    if (rc != VLV_OK) {
        pthread_rwlock_destroy(&st->lock);
        free(st);
        return rc;
    }
    say(st, VLV_LOG_INFO, "mod-example ready");
    *state = st;
    return VLV_OK;
}

static int32_t example_process(void *state, vlv_request *req) {
    struct state *st = (struct state *)state;
    vlv_str name = VLV_STR("sender");
    vlv_str sender;
    vlv_str text = VLV_STR("sender blocked by mod-example");
    int blocked;
    if (st->host->request_get(req, name, &sender) != VLV_OK) {
        return VLV_OK; /* no sender attribute: no opinion */
    }
    pthread_rwlock_rdlock(&st->lock);
    blocked = st->blocked_len > 0 && sender.len == st->blocked_len &&
              memcmp(sender.ptr, st->blocked, sender.len) == 0;
    pthread_rwlock_unlock(&st->lock);
    if (blocked) {
        return st->host->reply_set(req, VLV_ACTION_REJECT, text);
    }
    return VLV_OK;
}

static int32_t example_reconf(void *state) {
    return load_config((struct state *)state);
}

static void example_close(void *state) {
    struct state *st = (struct state *)state;
    pthread_rwlock_destroy(&st->lock);
    free(st);
}

VLV_MODULE_EXPORT const vlv_module_def vlv_module_v1 = {
    VLV_MODULE_MAGIC,
    VLV_ABI_MAJOR,
    VLV_ABI_MINOR,
    sizeof(vlv_module_def),
    0,
    VLV_STR("mod-example"),
    VLV_STR("1.0"),
    VLV_STR("rejects one configured sender"),
    example_init,
    example_process,
    example_reconf,
    example_close,
    NULL, /* tick */
    NULL, /* process_poll (ABI 0.5): this module answers at once */
    NULL, /* process_drop */
};
