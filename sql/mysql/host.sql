-- valvulad's own tables on MySQL 8 / MariaDB 10.x (created at first connection when
-- missing). Keys are byte strings: identities match exactly as the module gives them.
CREATE TABLE IF NOT EXISTS vlv_counter (
    ns     VARBINARY(64)  NOT NULL,
    ckey   VARBINARY(512) NOT NULL,
    win    VARBINARY(32)  NOT NULL,
    period BIGINT         NOT NULL,
    used   BIGINT         NOT NULL,
    PRIMARY KEY (ns, ckey, win)
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
