/*
 * valvula/module.h - the valvulad module ABI, version 1.0.
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
 *    host's and its abi_minor is not greater than the host's. 1.0 is the
 *    layout of 0.5, frozen: modules built for 0.0 to 0.5 load on every 1.x
 *    host too (they see a host table that says 0.5).
 *  - What a minor (1.1, 1.2, ...) may do: append fields to the END of
 *    vlv_host_api and vlv_module_def, add VLV_* constants, flags a host
 *    ignores when unset, status codes returned only by new functions, and
 *    new hooks a host calls only when set. It never changes, reorders or
 *    removes a field, a constant's value, a function's signature or
 *    meaning, or what an older module must provide. Anything else is a new
 *    major. A module built against 1.m loads on every host 1.n with n >= m
 *    (tests/fixtures/abi-1.0 keeps the 1.0 header, and a test loads a
 *    module built against it into the current host).
 *  - Status codes: 0 (VLV_OK) is success; negative values are errors.
 *  - Calls never unwind across the boundary: C++ modules must catch
 *    exceptions, Rust modules must not panic out (the Rust SDK catches panics).
 *
 * Only <stdint.h> and <stddef.h> are needed. The header is C99, C11 and C++11
 * clean under -Wall -Wextra -pedantic, and a module's source may be C or C++
 * (VLV_MODULE_EXPORT below; tests/fixtures/cxx/mod_cxx.cpp is a C++ module).
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
#define VLV_ABI_MAJOR 1
#define VLV_ABI_MINOR 0

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
/* ABI 0.5: an asynchronous storage call was submitted; its status and outputs
 * are written before the host calls process_poll() again (see process_poll). */
#define VLV_PENDING 1
/* ABI 0.5: returned by process_poll on its first call (nothing submitted): decide
 * this request with process() on a worker thread instead, because it must block
 * (a rare, slow path such as a schema change or a day's rollover). */
#define VLV_BLOCKING 2

/* ABI 0.5: consume_async() flag: answer what the call would charge, charge
 * nothing (as peek()). */
#define VLV_CONSUME_PEEK 0x1u

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

/* The module promises that process(), reconf() and tick() never block (no
 * I/O, no locks held long, microseconds of work). The host holds it to that:
 * its blocking storage calls are refused with VLV_E_INVALID outside init().
 * The host runs its calls on the module's own threads under the module
 * timeout all the same (earlier hosts called process() inline on the event
 * loop, where one that slept stalled every listener), so a broken promise
 * costs only the module's own requests. */
#define VLV_FLAG_NONBLOCKING 0x1u

/* The host never runs two calls of this module at the same time (it takes a
 * lock around every hook). For modules with thread-unsafe state; costs
 * throughput. Without this flag, process() and tick() may run concurrently
 * on several threads. A call that hangs past its timeout keeps the lock: the
 * module's later calls time out too, and close() is skipped at shutdown after
 * waiting 2 s for the lock. */
#define VLV_FLAG_SERIALIZE 0x2u

/* ---------------------------------------------------------------------------
 * Threads: who calls each hook, and what may overlap (as Envoy's abi.h says)
 *
 *   hook          thread                          may overlap
 *   init          the loading thread, once        nothing (no other hook yet)
 *   process       one of the module's own threads  process, process_poll,
 *                 (module_threads of them)         reconf, tick; a call that
 *                                                 timed out may still run
 *   process_poll  an event-loop thread            everything above; never
 *                                                 another poll of its req
 *   process_drop  the thread dropping the request  as process_poll
 *   reconf        one of the module's threads     process, process_poll, tick
 *   tick          one of the module's threads     process, process_poll, reconf
 *   close         the stopping thread, once       calls that timed out and
 *                                                 still run (they are never
 *                                                 waited for); nothing else
 *
 * Every call except init and close runs under the listener's module timeout:
 * past it the request gets the on-error action and the host stops waiting,
 * but cannot stop the call; the module's state must stay valid for it until
 * it returns, even after close(). With VLV_FLAG_SERIALIZE nothing overlaps.
 * process_poll runs on the event loop and must never block (a poll that
 * blocks holds an event-loop thread and delays other requests): the host
 * logs a poll that took over 100 ms and from then on, until a restart, calls
 * the module's process() on its own threads instead.
 * A module that crashes the process (a segmentation fault, an abort) kills
 * the worker: the master restarts it at once and names the module, and after
 * repeated crashes starts it disabled until the next reload (valvulad(8)). */

/* ---------------------------------------------------------------------------
 * Storage: SQL values, dialects, counting windows (ABI 0.2)
 * ------------------------------------------------------------------------- */

/* Type of a vlv_value (uint32_t). */
#define VLV_VALUE_NULL 0u  /* SQL NULL (distinct from an empty text) */
#define VLV_VALUE_INT 1u   /* i */
#define VLV_VALUE_FLOAT 2u /* f */
#define VLV_VALUE_TEXT 3u  /* s: UTF-8 */
#define VLV_VALUE_BLOB 4u  /* s: any bytes */

/* A parameter bound to a `?` placeholder, or a cell of a query result.
 * Only the member named by `type` is meaningful.
 * OWNERSHIP: parameters are copied by the host; cells are borrowed from their
 * vlv_rows and valid until rows_free(). */
typedef struct vlv_value {
    uint32_t type;
    uint32_t reserved; /* 0 */
    int64_t i;
    double f;
    vlv_str s;
} vlv_value;

/* The SQL dialect of the configured database (uint32_t), from sql_dialect(). */
#define VLV_DIALECT_NONE 0u   /* no storage available to this module */
#define VLV_DIALECT_SQLITE 1u
#define VLV_DIALECT_MYSQL 2u  /* MySQL 8 or MariaDB 10.x */

/* One statement of a sql_batch(). */
typedef struct vlv_stmt {
    vlv_str sql;
    const vlv_value *params;
    size_t n_params;
} vlv_stmt;

/* Kinds of counting windows (uint32_t). Calendar windows follow the daemon's
 * configured time zone ([storage] time_zone). */
#define VLV_WINDOW_HOUR 1u
#define VLV_WINDOW_DAY 2u
#define VLV_WINDOW_WEEK 3u    /* ISO week, Monday to Sunday */
#define VLV_WINDOW_MONTH 4u
#define VLV_WINDOW_SLIDING 5u /* the last `seconds` seconds; kept in 60 buckets,
                                 so a charge stays counted up to seconds/60
                                 longer than the window (never shorter): the
                                 limit holds in every interval of that length */

/* One (window, limit) pair of a consumption. */
typedef struct vlv_window {
    uint32_t kind;     /* VLV_WINDOW_* */
    uint32_t reserved; /* 0 */
    int64_t seconds;   /* SLIDING only: the window's length, >= 1 */
    int64_t limit;     /* most units admitted in the window; < 0: no limit
                          (counted only) */
} vlv_window;

/* The state of one window after consume() or peek(). */
typedef struct vlv_window_state {
    int64_t used;      /* used in the current window, including this charge
                          when it was admitted */
    int64_t remaining; /* limit - used (>= 0), or -1 without a limit */
    int64_t resets_at; /* when the count next goes down (seconds since epoch) */
    uint32_t admitted; /* 1 if this window alone admits the amount */
    uint32_t reserved;
} vlv_window_state;

/* One key of consume_all() (ABI 0.4). */
typedef struct vlv_charge {
    vlv_str key;               /* as consume()'s key */
    int64_t amount;            /* >= 0 */
    const vlv_window *windows; /* n_windows entries, as consume()'s windows */
    size_t n_windows;          /* 1-16 */
    vlv_window_state *states;  /* out (may be NULL): n_windows entries */
    uint32_t admitted;         /* out: 1 if this key alone admits its amount */
    uint32_t reserved;         /* 0 */
} vlv_charge;

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

/* The result of sql_query(): rows of cells, owned by the host.
 * LIFETIME: until rows_free(). THREADS: any thread, one at a time. */
typedef struct vlv_rows vlv_rows;

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
     * ([module.NAME] in valvulad.toml, NAME being the module's name). key "" is
     * the whole section. The value is written to buf as text: strings as they
     * are, numbers and booleans in TOML notation, arrays and tables as JSON.
     * buf/cap: module-owned buffer. *len: receives the value's length. No NUL
     * is written: exactly *len bytes are, so a module that wants a C string
     * passes cap - 1 and terminates it itself.
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

    /* ---- ABI 0.2: storage. Check with VLV_HAS(host, vlv_host_api, reset).
     *
     * Every storage call blocks until the database answered; call them from
     * init, process, reconf or tick. A VLV_FLAG_NONBLOCKING module may call
     * them from init only (elsewhere: VLV_E_INVALID). Errors:
     * VLV_E_UNAVAILABLE when the database is down (the daemon retries it with
     * backoff), VLV_E_INVALID for a bad call, VLV_E_FAILED for a failing
     * statement; the host logs the details.
     * SQL text may not contain quoted literals (' or "): every value goes in
     * as a `?` parameter, so no request value is ever part of SQL text. Schema
     * statements (CREATE, ALTER) may quote: `note VARCHAR(20) DEFAULT ''`.
     *
     * TABLES: a table belongs, for the daemon's run, to the first module that
     * runs CREATE TABLE for it: run CREATE TABLE IF NOT EXISTS for each of
     * yours in init, at every start (modules init in configuration order). A
     * statement that names another module's table, or any name starting with
     * vlv_ (the host's counters and tokens), anywhere outside its comments and
     * string literals, is refused (VLV_E_INVALID) before it reaches the
     * database; so are PRAGMA, ATTACH, SET, PREPARE and EXECUTE statements,
     * writes to sqlite_master, and tables named like an SQL word. Prefix your
     * tables with your module's name: a table named like another module's
     * column would make that module's statements refused.
     *
     * SCHEMA CHANGES: CREATE TABLE, CREATE INDEX, ALTER TABLE and DROP of your
     * own tables are allowed on both databases, from init or tick (they may
     * take long on a large table). On MySQL/MariaDB every schema statement
     * commits at once: never put one in sql_batch or beside a charge, whose
     * all-or-nothing it would break. */

    /* VLV_DIALECT_* of the configured database. */
    uint32_t (*sql_dialect)(vlv_module_ctx *ctx);

    /* Runs one statement with params[0..n_params) bound to its `?`s.
     * *affected (may be NULL): rows changed. *last_insert_id (may be NULL):
     * the id an INSERT generated, else 0. Autocommitted. */
    int32_t (*sql_exec)(vlv_module_ctx *ctx, vlv_str sql, const vlv_value *params,
                        size_t n_params, uint64_t *affected, int64_t *last_insert_id);

    /* Runs n statements in ONE transaction: all take effect or none.
     * affected (may be NULL): an array of n, rows changed by each. */
    int32_t (*sql_batch)(vlv_module_ctx *ctx, const vlv_stmt *stmts, size_t n,
                         uint64_t *affected);

    /* Runs a query. On VLV_OK *rows is a new result set the module must
     * release with rows_free(). */
    int32_t (*sql_query)(vlv_module_ctx *ctx, vlv_str sql, const vlv_value *params,
                         size_t n_params, vlv_rows **rows);

    /* Rows and columns of a result set. */
    size_t (*rows_count)(const vlv_rows *rows);
    size_t (*rows_columns)(const vlv_rows *rows);

    /* The cell at (row, col). *out: borrowed until rows_free().
     * Returns VLV_OK or VLV_E_NOT_FOUND outside the result. */
    int32_t (*rows_get)(const vlv_rows *rows, size_t row, size_t col, vlv_value *out);

    /* The name of column col. *out: borrowed until rows_free(). */
    int32_t (*rows_column_name)(const vlv_rows *rows, size_t col, vlv_str *out);

    /* Releases a result set (NULL is ignored). */
    void (*rows_free)(vlv_rows *rows);

    /* Charges `amount` (>= 0) to `key` in every window, atomically: if every
     * window admits it all are charged, otherwise nothing changes. Exact
     * across threads, connections and daemons sharing one database; returns
     * only after the charge is durable. Keys (1-512 bytes) are namespaced per
     * module and compared byte for byte. n: 1-16 windows, each kind at most
     * once. states (may be NULL): an array of n, filled in window order.
     * *admitted: 1 if charged, 0 if refused. */
    int32_t (*consume)(vlv_module_ctx *ctx, vlv_str key, int64_t amount,
                       const vlv_window *windows, size_t n, vlv_window_state *states,
                       uint32_t *admitted);

    /* What consume() would answer, without charging anything. */
    int32_t (*peek)(vlv_module_ctx *ctx, vlv_str key, int64_t amount,
                    const vlv_window *windows, size_t n, vlv_window_state *states,
                    uint32_t *admitted);

    /* Forgets every window of `key` (an administrator's reset). */
    int32_t (*reset)(vlv_module_ctx *ctx, vlv_str key);

    /* ---- ABI 0.3. Check with VLV_HAS(host, vlv_host_api, consume_once).
     *
     * consume(), at most once per `token` (any length, as keys; per module; e.g.
     * Postfix's queue id with the stage and recipient). When this module
     * already had a consumption admitted under `token` in the last
     * VLV_ONCE_KEEP_SECONDS, nothing is charged again: *repeated = 1,
     * *admitted = 1 and states show the current counts. Otherwise as
     * consume(), *repeated = 0; an admitted charge records the token in the
     * same transaction, so a crash never keeps one without the other, and a
     * refused one records nothing (a retry is judged again). For requests
     * Postfix re-sends after its policy timeout. repeated may be NULL. */
    int32_t (*consume_once)(vlv_module_ctx *ctx, vlv_str key, vlv_str token,
                            int64_t amount, const vlv_window *windows, size_t n,
                            vlv_window_state *states, uint32_t *admitted,
                            uint32_t *repeated);

    /* sql_exec() of one INSERT, UPDATE, DELETE or REPLACE, at most once per
     * `token` (per module; the same store as consume_once()'s tokens). When a
     * run under `token` changed rows in the last VLV_ONCE_KEEP_SECONDS, the
     * statement is not run again: *repeated = 1, *affected = 0. Otherwise it
     * runs, *repeated = 0, and the token is kept in the same transaction only
     * if it changed rows (a refused conditional UPDATE may be tried again).
     * Concurrent calls with one token, from any daemon on the database, run
     * the statement once. affected, last_insert_id, repeated may be NULL. */
    int32_t (*sql_exec_once)(vlv_module_ctx *ctx, vlv_str token, vlv_str sql,
                             const vlv_value *params, size_t n_params,
                             uint64_t *affected, int64_t *last_insert_id,
                             uint32_t *repeated);

    /* ---- ABI 0.4. Check with VLV_HAS(host, vlv_host_api, time_zone).
     *
     * Charges n keys (1-16, all different) together: if every key admits its
     * amount in every window, all are charged in one transaction; otherwise
     * nothing is charged at all (*admitted = 0). For a request that several
     * policies count (a user's limit and its domain's): a refusal by one must
     * not use up the others' quota. Each charges[i].admitted and .states tell
     * that key's windows: after an admitted call, the counts with the charge;
     * after a refused one, the counts as they are, and whether that key alone
     * would have admitted its amount (the first 0 is the refusing key).
     * token: as consume_once() (len 0: no token): when this module already had
     * a call admitted under `token` in the last VLV_ONCE_KEEP_SECONDS, nothing
     * is charged, *repeated = 1, *admitted = 1 and states show the counts.
     * admitted and repeated may be NULL. THREADS: any thread but the event
     * loop's (as every storage call). */
    int32_t (*consume_all)(vlv_module_ctx *ctx, vlv_str token, vlv_charge *charges,
                           size_t n, uint32_t *admitted, uint32_t *repeated);

    /* The IANA name of the time zone calendar windows follow ([storage]
     * time_zone, with "local" resolved to the system's zone name when the
     * configuration was read), e.g. "Europe/Madrid". *name: static, valid until
     * the daemon exits. Returns VLV_OK, or VLV_E_UNAVAILABLE without storage. */
    int32_t (*time_zone)(vlv_module_ctx *ctx, vlv_str *name);

    /* ---- ABI 0.5: completion-based storage. Check with
     * VLV_HAS(host, vlv_host_api, sql_exec_async).
     *
     * For modules with a process_poll hook: a request waits for the database
     * without holding a thread, and the commit of its charge is shared with
     * the other requests of the moment (one transaction, one disk flush).
     * Call them only from process_poll, with the req it was given (anything
     * else: VLV_E_INVALID). Each copies its inputs (SQL, parameters, keys,
     * windows, token) before it returns, and returns either VLV_PENDING (the
     * call was submitted) or its final status at once (an invalid argument).
     * Either way, *status and the outputs are written before the host calls
     * process_poll again for this request: the module returns VLV_PENDING from
     * process_poll, and is polled again once every call it submitted has its
     * answer. Until then the output pointers, the charges array itself (the
     * host writes each charges[i].admitted) and charges[i].states must stay valid;
     * the host writes nothing after process_drop().
     * Statuses as the synchronous forms. */

    /* consume_all() (flags 0) or peek() of several keys (VLV_CONSUME_PEEK).
     * then: n_then (0-16) writes (INSERT, UPDATE, DELETE, REPLACE) made in the
     * charge's own transaction once it is admitted, and not when it is refused,
     * repeated or a peek: an accounting row committed with its charge, in the
     * same disk flush. Each is atomic on its own: one that fails is undone alone
     * and does not undo the charge. then_status (n_then entries, may be NULL)
     * receives each one's status, or VLV_E_NOT_FOUND when it did not run. */
    int32_t (*consume_async)(vlv_module_ctx *ctx, vlv_request *req, vlv_str token,
                             uint32_t flags, vlv_charge *charges, size_t n,
                             const vlv_stmt *then, size_t n_then, int32_t *then_status,
                             uint32_t *admitted, uint32_t *repeated, int32_t *status);

    /* sql_query(): *rows is set when *status is VLV_OK; free it with
     * rows_free() (also from process_drop if the call is abandoned later). */
    int32_t (*sql_query_async)(vlv_module_ctx *ctx, vlv_request *req, vlv_str sql,
                               const vlv_value *params, size_t n_params,
                               vlv_rows **rows, int32_t *status);

    /* sql_exec() of a write (INSERT, UPDATE, DELETE, REPLACE; schema changes
     * belong in init or tick: VLV_E_INVALID here), or with a token (len > 0)
     * sql_exec_once(). affected, last_insert_id and repeated may be NULL. */
    int32_t (*sql_exec_async)(vlv_module_ctx *ctx, vlv_request *req, vlv_str token,
                              vlv_str sql, const vlv_value *params, size_t n_params,
                              uint64_t *affected, int64_t *last_insert_id,
                              uint32_t *repeated, int32_t *status);

    /* The most verbose VLV_LOG_* level the daemon writes now (0: none), so a
     * module need not format lines that would be dropped. Any thread. */
    uint32_t (*log_level)(vlv_module_ctx *ctx);
} vlv_host_api;

/* How long consume_once(), consume_all() and sql_exec_once() remember a token:
 * one hour, far longer than Postfix takes to re-send a request it got no answer
 * to (2 x smtpd_policy_service_timeout + 1 s: 201 s with the defaults). Tokens
 * are kept per request, so a longer time only makes the database grow (ABI 0.3
 * kept them two days). */
#define VLV_ONCE_KEEP_SECONDS 3600

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

    /* Called once, after the load checks, before any other hook, on the
     * loading thread (no module timeout: the daemon waits for it).
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
     * state. The library itself is never unloaded. Optional (NULL).
     * A process_poll call still pending at close (a request past the shutdown
     * grace) is never polled or handed to process_drop again. A process,
     * reconf or tick call that timed out may still be running during and
     * after close: free only what it cannot be using (or nothing; the process
     * exits next). THREADS: the stopping thread. */
    void (*close)(void *state);

    /* Clock boundaries crossed: kinds is a set of VLV_TICK_* bits, now the
     * host time (seconds since the epoch). Called once a minute, with HOUR,
     * DAY and MONTH added when those begin. Runs on the blocking pool under
     * the module timeout. Optional (NULL). THREADS: one of the module's
     * threads; may overlap process, process_poll and reconf. */
    void (*tick)(void *state, uint32_t kinds, int64_t now);

    /* ---- ABI 0.5 (optional, NULL in older modules).
     *
     * Decides one request like process(), but may wait for the database
     * without holding a thread: when set, the host calls it instead of
     * process(), on its event loop, under the listener's module timeout.
     * First call: *call is NULL. To wait, submit calls with the _async
     * storage functions, keep what you need in memory of your own, point
     * *call at it and return VLV_PENDING; once every submitted call has its
     * answer, the host calls process_poll again with the same req and *call.
     * Finish as process() does (reply_set, return a status), after freeing
     * *call. If the host gives up on the request (timeout, shutdown) while a
     * call is pending, it calls process_drop(state, *call) instead, and never
     * polls that call again.
     * It must not block: no sleeping, no synchronous storage calls (they
     * would stall every request of the listener); a request that must block
     * returns VLV_BLOCKING from its first poll, and the host calls process()
     * for it on a worker thread. THREADS: polls of one
     * request never overlap, but may run on different threads; polls of
     * different requests run concurrently. A module with VLV_FLAG_SERIALIZE
     * is called through process() as before. */
    int32_t (*process_poll)(void *state, vlv_request *req, void **call);

    /* Frees a call the host abandoned (see process_poll). Required with
     * process_poll when the module keeps memory in *call. */
    void (*process_drop)(void *state, void *call);
} vlv_module_def;

/* Declares the symbol in a module, in C and in C++ alike:
 *     VLV_MODULE_EXPORT const vlv_module_def vlv_module_v1 = { ... };
 * In C++ a const object at namespace scope has internal linkage and a mangled
 * name: the macro gives it C linkage (extern "C"), which makes it external. */
#ifdef __cplusplus
#define VLV_EXTERN_C_ extern "C"
#else
#define VLV_EXTERN_C_
#endif
#if defined(__GNUC__) || defined(__clang__)
#define VLV_MODULE_EXPORT VLV_EXTERN_C_ __attribute__((visibility("default")))
#else
#define VLV_MODULE_EXPORT VLV_EXTERN_C_
#endif

#ifdef __cplusplus
}
#endif

#endif /* VALVULA_MODULE_H */
