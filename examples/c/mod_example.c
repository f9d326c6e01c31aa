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
 * and answers DUNNO to everything else. It keeps no per-request state, so process()
 * is safe to run on several threads at once.
 */
#include <stdlib.h>
#include <string.h>

#include <valvula/module.h>

struct state {
    const vlv_host_api *host;
    vlv_module_ctx *ctx;
    char blocked[256];
    size_t blocked_len;
};

static void say(struct state *st, uint32_t level, const char *text) {
    vlv_str s;
    s.ptr = text;
    s.len = strlen(text);
    st->host->log(st->ctx, level, s);
}

/* Reads blocked_sender from the configuration (missing = block nobody). */
static int32_t load_config(struct state *st) {
    vlv_str key = VLV_STR("blocked_sender");
    size_t len = 0;
    int32_t rc = st->host->config_get(st->ctx, key, st->blocked, sizeof st->blocked, &len);
    if (rc == VLV_E_NOT_FOUND) {
        st->blocked_len = 0;
        return VLV_OK;
    }
    if (rc != VLV_OK) {
        say(st, VLV_LOG_ERROR, "blocked_sender is longer than 255 bytes");
        return rc;
    }
    st->blocked_len = len;
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
    rc = load_config(st);
    if (rc != VLV_OK) {
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
    if (st->host->request_get(req, name, &sender) != VLV_OK) {
        return VLV_OK; /* no sender attribute: no opinion */
    }
    if (st->blocked_len > 0 && sender.len == st->blocked_len &&
        memcmp(sender.ptr, st->blocked, sender.len) == 0) {
        return st->host->reply_set(req, VLV_ACTION_REJECT, text);
    }
    return VLV_OK;
}

static int32_t example_reconf(void *state) {
    return load_config((struct state *)state);
}

static void example_close(void *state) {
    free(state);
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
