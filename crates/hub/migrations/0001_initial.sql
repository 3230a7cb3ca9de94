-- storehub schema 1: records and their change log, activity, box reports, firmware updates.
--
-- Text keys use the "C" collation so that ordering by them is byte order, as in the
-- embedded backend: record ids in a snapshot come in the same order from both.

CREATE TABLE records (
    store         text COLLATE "C" NOT NULL,
    module        text COLLATE "C" NOT NULL,
    id            text COLLATE "C" NOT NULL,
    -- The sequence number of the record's last write in its module. A record is its own
    -- change-log entry: a delta pull scans (store, module, seq).
    seq           bigint NOT NULL,
    -- Set for a tombstone, kept until the retention expires.
    deleted_at_ms bigint,
    -- Canonical JSON; empty for a tombstone.
    json          text NOT NULL,
    -- The version this one replaced and the sequence number it was written at, so a box
    -- holding it gets a merge patch.
    prev_seq      bigint,
    prev_json     text,
    PRIMARY KEY (store, module, id)
);
CREATE UNIQUE INDEX records_changes ON records (store, module, seq);
CREATE INDEX records_tombstones ON records (deleted_at_ms) WHERE deleted_at_ms IS NOT NULL;

-- One row per module: writers lock it, so a module's sequence numbers commit in order.
CREATE TABLE module_heads (
    store   text COLLATE "C" NOT NULL,
    module  text COLLATE "C" NOT NULL,
    head    bigint NOT NULL DEFAULT 0,
    -- Highest sequence number of a pruned tombstone: deltas from below it are incomplete.
    horizon bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (store, module)
);

-- Activity is stored once per (store, event id): the database, not a process, dedupes, so
-- a box pushing the same batch to two replicas stores it once.
CREATE TABLE activity (
    store              text COLLATE "C" NOT NULL,
    seq                bigint NOT NULL,
    id                 text COLLATE "C" NOT NULL,
    received_at_ms     bigint NOT NULL,
    hub_received_at_ms bigint NOT NULL,
    event              text NOT NULL,
    PRIMARY KEY (store, seq),
    UNIQUE (store, id)
);

CREATE TABLE activity_heads (
    store text COLLATE "C" PRIMARY KEY,
    head  bigint NOT NULL DEFAULT 0
);

CREATE TABLE box_reports (
    store  text COLLATE "C" PRIMARY KEY,
    report jsonb NOT NULL
);

CREATE TABLE ota_bundles (
    version text COLLATE "C" PRIMARY KEY,
    meta    jsonb NOT NULL
);

-- Keyed by store id, or '' for the fleet default.
CREATE TABLE ota_targets (
    key     text COLLATE "C" PRIMARY KEY,
    version text COLLATE "C" NOT NULL
);

CREATE TABLE ota_boxes (
    store text COLLATE "C" PRIMARY KEY,
    state jsonb NOT NULL
);
