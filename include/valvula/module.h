/*
 * valvula/module.h - the valvulad module ABI, version 0.1.
 *
 * A valvulad module is a shared object that exports ONE constant data symbol,
 * `vlv_module_v1`, of type `vlv_module_def`. valvulad checks that definition
 * before running any code of the module, calls `init` once, then `process` for
 * every policy request of every listener whose chain names the module.
 *
 * Rules that hold for the whole ABI:
 *
 *  - Only fixed-width integers, size_t and pointers cross the boundary: no C
 *    enums, no bool, no struct passed by value except `vlv_str`.
 *  - Strings are `vlv_str` {ptr, len}: not NUL-terminated, may contain any byte
 *    (the host only hands out UTF-8). A NULL ptr is allowed when len is 0.
 *  - OWNERSHIP: what the host passes to a module is borrowed; what a module
 *    passes to the host is copied by the host before the call returns. Nobody
 *    frees memory of the other side.
 *  - Structs are append-only. Every struct starts with `struct_size`; a field
 *    added in a later minor version is present only when VLV_HAS() says so.
 *  - Compatibility: the host loads a module when its abi_major equals the
 *    host's and its abi_minor is not greater than the host's. During 0.x a new
 *    minor may append fields and host functions, never change existing ones.
 *  - Status codes: 0 (VLV_OK) is success; negative values are errors.
 *  - Calls never unwind across the boundary: C++ modules must catch
 *    exceptions, Rust modules must not panic out (the Rust SDK catches panics).
 *
 * Only <stdint.h> and <stddef.h> are needed. The header is C99, C11 and C++11
 * clean under -Wall -Wextra -pedantic.
 */
#ifndef VALVULA_MODULE_H
#define VALVULA_MODULE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------------------
 * Versions and identification
 * ------------------------------------------------------------------------- */

/* ABI version this header describes. */
#define VLV_ABI_MAJOR 0
#define VLV_ABI_MINOR 1

/* First field of vlv_module_def: the bytes "VLVM" read as a little-endian
 * uint32. Guards against loading a library that merely has the symbol. */
#define VLV_MODULE_MAGIC 0x4D564C56u

/* The name of the exported definition symbol (for dlsym). */
#define VLV_MODULE_SYMBOL "vlv_module_v1"

/* ---------------------------------------------------------------------------
 * Strings
 * ------------------------------------------------------------------------- */

/* A byte string that is not NUL-terminated.
 * OWNERSHIP: never transferred; see each function for how long ptr is valid. */
typedef struct vlv_str {
    const char *ptr;
    size_t len;
} vlv_str;

/* A vlv_str for a string literal: VLV_STR("mod-example"). */
#define VLV_STR(lit) { (lit), sizeof(lit) - 1 }

/* ---------------------------------------------------------------------------
 * Status codes (int32_t)
 * ------------------------------------------------------------------------- */

#define VLV_OK 0
/* The attribute, key or item asked for does not exist. */
#define VLV_E_NOT_FOUND (-1)
/* An argument was invalid (NULL pointer, bad action, text with CR/LF/NUL). */
#define VLV_E_INVALID (-2)
/* The caller's buffer is too small; the needed size was written to *len. */
#define VLV_E_TOO_SMALL (-3)
/* Anything else that went wrong inside the module or the host. */
#define VLV_E_FAILED (-4)
/* The service is temporarily unavailable (e.g. the database is down). */
#define VLV_E_UNAVAILABLE (-5)

/* ---------------------------------------------------------------------------
 * Policy actions (uint32_t), for reply_set()
 *
 * On the wire they become `action=<verb>[ <text>]`, the verbs of Postfix's
 * access(5). DUNNO is 0 so that a zeroed reply means "no opinion".
 * ------------------------------------------------------------------------- */

#define VLV_ACTION_DUNNO 0u           /* no opinion: the next module decides */
#define VLV_ACTION_OK 1u              /* accept; ends the chain */
#define VLV_ACTION_REJECT 2u          /* 5xx with the text */
#define VLV_ACTION_DEFER 3u           /* 4xx with the text */
#define VLV_ACTION_DEFER_IF_PERMIT 4u /* 4xx unless a later restriction rejects */
#define VLV_ACTION_DEFER_IF_REJECT 5u /* 4xx if a later restriction rejects */
#define VLV_ACTION_DISCARD 6u         /* accept and drop the message */
#define VLV_ACTION_HOLD 7u            /* accept and put on hold */
#define VLV_ACTION_PREPEND 8u         /* text = header line to add (required) */
#define VLV_ACTION_REDIRECT 9u        /* text = address (required) */
#define VLV_ACTION_BCC 10u            /* text = address (required) */
#define VLV_ACTION_FILTER 11u         /* text = transport:destination (required) */
#define VLV_ACTION_WARN 12u           /* log the text, no decision */
#define VLV_ACTION_INFO 13u           /* log the text, no decision */
#define VLV_ACTION_RAW 14u            /* text is the whole action: "450 4.7.1 ..."
                                         or a restriction class name (required) */

/* Longest reply text accepted by reply_set(), in bytes. */
#define VLV_REPLY_TEXT_MAX 2000u

/* ---------------------------------------------------------------------------
 * Log levels (uint32_t), for log()
 * ------------------------------------------------------------------------- */

#define VLV_LOG_ERROR 1u
#define VLV_LOG_WARN 2u
#define VLV_LOG_INFO 3u
#define VLV_LOG_DEBUG 4u
#define VLV_LOG_TRACE 5u

/* ---------------------------------------------------------------------------
 * Periodic ticks (uint32_t bit set), for the tick hook
 * ------------------------------------------------------------------------- */

#define VLV_TICK_MINUTE 0x1u /* a new minute has started */
#define VLV_TICK_HOUR 0x2u   /* a new hour has started */
#define VLV_TICK_DAY 0x4u    /* a new day has started (daemon's time zone) */
#define VLV_TICK_MONTH 0x8u  /* a new month has started (daemon's time zone) */

/* ---------------------------------------------------------------------------
 * Module flags (uint32_t bit set), in vlv_module_def.flags
 * ------------------------------------------------------------------------- */

/* process() never blocks (no I/O, no locks held long, microseconds of work):
 * the host calls it inline on its event loop instead of on the module's
 * blocking thread pool. A NONBLOCKING module that blocks stalls the daemon. */
#define VLV_FLAG_NONBLOCKING 0x1u

/* The host never runs two calls of this module at the same time (it takes a
 * lock around every hook). For modules with thread-unsafe state; costs
 * throughput. Without this flag, process() and tick() may run concurrently
 * on several threads. */
#define VLV_FLAG_SERIALIZE 0x2u

/* ---------------------------------------------------------------------------
 * Opaque handles
 * ------------------------------------------------------------------------- */

/* The host's handle for one loaded module: pass it back to host functions.
 * LIFETIME: from init until the daemon exits (modules are never unloaded).
 * THREADS: may be used from any thread. */
typedef struct vlv_module_ctx vlv_module_ctx;

/* One policy request being processed.
 * LIFETIME: valid only during the process() call that received it.
 * THREADS: use it only on the thread that runs that process() call. */
typedef struct vlv_request vlv_request;

/* ---------------------------------------------------------------------------
 * Host services (given to init; valid until the daemon exits)
 * ------------------------------------------------------------------------- */

typedef struct vlv_host_api {
    /* sizeof(vlv_host_api) in the host that filled it in. Check newer
     * fields with VLV_HAS(api, vlv_host_api, field). */
    uint32_t struct_size;
    /* The host's ABI version. */
    uint16_t abi_major;
    uint16_t abi_minor;

    /* Writes one line to the daemon's log, tagged with the module's name.
     * level: VLV_LOG_*. msg: copied before return; CR/LF are replaced.
     * THREADS: any thread, any time after init started. */
    void (*log)(vlv_module_ctx *ctx, uint32_t level, vlv_str msg);

    /* Reads one key of the module's own configuration section
     * ([module.NAME.config] in valvulad.toml). key "" is the whole section.
     * The value is written to buf as text: strings as they are, numbers and
     * booleans in TOML notation, arrays and tables as JSON.
     * buf/cap: module-owned buffer. *len: receives the value's length.
     * Returns VLV_OK, VLV_E_NOT_FOUND, or VLV_E_TOO_SMALL (then *len holds the
     * size needed and buf is untouched).
     * THREADS: any thread. The section is replaced on reload, before reconf. */
    int32_t (*config_get)(vlv_module_ctx *ctx, vlv_str key, char *buf, size_t cap,
                          size_t *len);

    /* Looks up an attribute of the request by name (the last one wins when
     * Postfix sent it twice). *value: borrowed, valid until process() returns.
     * Returns VLV_OK or VLV_E_NOT_FOUND (attribute not sent; an attribute sent
     * with an empty value is found, with len 0). */
    int32_t (*request_get)(const vlv_request *req, vlv_str name, vlv_str *value);

    /* The index-th attribute in wire order (0-based), unknown ones included.
     * *name and *value: borrowed, valid until process() returns.
     * Returns VLV_OK or VLV_E_NOT_FOUND past the last attribute. */
    int32_t (*request_attr)(const vlv_request *req, size_t index, vlv_str *name,
                            vlv_str *value);

    /* Sets this module's answer to the request. action: VLV_ACTION_*.
     * text: copied; no CR, LF or NUL; at most VLV_REPLY_TEXT_MAX bytes;
     * required for PREPEND, REDIRECT, BCC, FILTER and RAW. A later call
     * replaces an earlier one. No call (or DUNNO) lets the chain go on.
     * Returns VLV_OK or VLV_E_INVALID (the reply is then unset, and if
     * process() returns VLV_OK anyway the host treats it as an error).
     * THREADS: only during process(), on its thread. */
    int32_t (*reply_set)(vlv_request *req, uint32_t action, vlv_str text);

    /* Current time as the host sees it, in seconds since the Unix epoch.
     * Use it rather than time(): tests move the host's clock. */
    int64_t (*now)(vlv_module_ctx *ctx);
} vlv_host_api;

/* True when the struct pointed to by p (of type T) has field f. */
#define VLV_HAS(p, T, f) \
    ((p)->struct_size >= offsetof(T, f) + sizeof(((T *)0)->f))

/* ---------------------------------------------------------------------------
 * The module definition (exported as `vlv_module_v1`)
 * ------------------------------------------------------------------------- */

typedef struct vlv_module_def {
    /* VLV_MODULE_MAGIC. */
    uint32_t magic;
    /* VLV_ABI_MAJOR / VLV_ABI_MINOR the module was built against. */
    uint16_t abi_major;
    uint16_t abi_minor;
    /* sizeof(vlv_module_def) as the module was built. */
    uint32_t struct_size;
    /* VLV_FLAG_* bits. Unknown bits are refused. */
    uint32_t flags;

    /* The module's unique name: what listeners name in their chain and the
     * key of its [module.NAME] section. 1-64 bytes of [A-Za-z0-9_.-].
     * version and description are free text for status and logs.
     * OWNERSHIP: static data of the module. */
    vlv_str name;
    vlv_str version;
    vlv_str description;

    /* Called once, after the load checks, before any other hook.
     * host: the host services, valid until exit. ctx: the module's handle.
     * *state: set it to the module's own state pointer, passed to every
     * other hook (may stay NULL).
     * Returns VLV_OK, or an error to refuse loading (the daemon then refuses
     * to start, naming the module and the status). Required (non-NULL). */
    int32_t (*init)(const vlv_host_api *host, vlv_module_ctx *ctx, void **state);

    /* Decides one policy request: read it with request_get/request_attr,
     * answer with reply_set, return VLV_OK. Any other return value, a reply
     * rejected by reply_set, or running past the listener's module timeout
     * makes the host answer with the listener's on-error action.
     * THREADS: concurrent calls unless VLV_FLAG_SERIALIZE. Required. */
    int32_t (*process)(void *state, vlv_request *req);

    /* The daemon reloaded its configuration (SIGHUP): re-read config_get.
     * Returning an error keeps the module running with what it had.
     * Optional (NULL). THREADS: may overlap process() calls. */
    int32_t (*reconf)(void *state);

    /* The daemon is stopping; no other hook is called afterwards. Free the
     * state. The library itself is never unloaded. Optional (NULL). */
    void (*close)(void *state);

    /* Clock boundaries crossed: kinds is a set of VLV_TICK_* bits, now the
     * host time (seconds since the epoch). Called once a minute, with HOUR,
     * DAY and MONTH added when those begin. Runs on the blocking pool under
     * the module timeout. Optional (NULL). */
    void (*tick)(void *state, uint32_t kinds, int64_t now);
} vlv_module_def;

/* Declares the symbol in a module:
 *     VLV_MODULE_EXPORT const vlv_module_def vlv_module_v1 = { ... };  */
#if defined(__GNUC__) || defined(__clang__)
#define VLV_MODULE_EXPORT __attribute__((visibility("default")))
#else
#define VLV_MODULE_EXPORT
#endif

#ifdef __cplusplus
}
#endif

#endif /* VALVULA_MODULE_H */
