-- valvulad's own tables on SQLite (created at start when missing).
-- Counters of the host's consume service: one row per (module, key, window) with the
-- current calendar period, and the head rows of sliding windows (period 0).
CREATE TABLE IF NOT EXISTS vlv_counter (
    ns     TEXT    NOT NULL,
    ckey   TEXT    NOT NULL,
    win    TEXT    NOT NULL,
    period INTEGER NOT NULL,
    used   INTEGER NOT NULL,
    PRIMARY KEY (ns, ckey, win)
) WITHOUT ROWID;
-- Rows of past periods count as 0; maintenance deletes them in small batches.
CREATE INDEX IF NOT EXISTS vlv_counter_expiry ON vlv_counter (win, period);
-- Buckets of sliding windows; expires = when no window counts the bucket any more.
CREATE TABLE IF NOT EXISTS vlv_slide (
    ns      TEXT    NOT NULL,
    ckey    TEXT    NOT NULL,
    win     TEXT    NOT NULL,
    bucket  INTEGER NOT NULL,
    used    INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    PRIMARY KEY (ns, ckey, win, bucket)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vlv_slide_expires ON vlv_slide (expires);
-- Tokens of consume_once: a consumption admitted under (ns, token) is not charged
-- again; forgotten after two days.
CREATE TABLE IF NOT EXISTS vlv_once (
    ns    TEXT    NOT NULL,
    token TEXT    NOT NULL,
    at    INTEGER NOT NULL,
    PRIMARY KEY (ns, token)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS vlv_once_at ON vlv_once (at);
-- Settings every daemon on the database must share: `time_zone`, the zone of calendar
-- windows, recorded by the first daemon; a daemon configured otherwise refuses to count.
CREATE TABLE IF NOT EXISTS vlv_meta (
    name  TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
