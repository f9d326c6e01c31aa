-- valvulad's own tables on MySQL 8 / MariaDB 10.x (created at first connection when
-- missing). Keys are byte strings: identities match exactly as the module gives them
-- (longer than 512 bytes: a prefix and a SHA-256 digest of the whole). `period` is the
-- start of a calendar window's period, and for a sliding window's head row (the row a
-- batch locks) when its last bucket expires; vlv_counter_expiry finds the rows of past
-- periods, which count as 0 and are deleted in small batches.
CREATE TABLE IF NOT EXISTS vlv_counter (
    ns     VARBINARY(64)  NOT NULL,
    ckey   VARBINARY(512) NOT NULL,
    win    VARBINARY(32)  NOT NULL,
    period BIGINT         NOT NULL,
    used   BIGINT         NOT NULL,
    PRIMARY KEY (ns, ckey, win),
    KEY vlv_counter_expiry (win, period)
) ENGINE = InnoDB;
CREATE TABLE IF NOT EXISTS vlv_slide (
    ns      VARBINARY(64)  NOT NULL,
    ckey    VARBINARY(512) NOT NULL,
    win     VARBINARY(32)  NOT NULL,
    bucket  BIGINT         NOT NULL,
    used    BIGINT         NOT NULL,
    expires BIGINT         NOT NULL,
    PRIMARY KEY (ns, ckey, win, bucket),
    KEY vlv_slide_expires (expires)
) ENGINE = InnoDB;
CREATE TABLE IF NOT EXISTS vlv_once (
    ns    VARBINARY(64)  NOT NULL,
    token VARBINARY(512) NOT NULL,
    at    BIGINT         NOT NULL,
    PRIMARY KEY (ns, token),
    KEY vlv_once_at (at)
) ENGINE = InnoDB;
-- Settings every daemon on the database must share: `time_zone`, the zone of calendar
-- windows, recorded by the first daemon; a daemon configured otherwise refuses to count.
CREATE TABLE IF NOT EXISTS vlv_meta (
    name  VARBINARY(64)  NOT NULL,
    value VARBINARY(255) NOT NULL,
    PRIMARY KEY (name)
) ENGINE = InnoDB;
