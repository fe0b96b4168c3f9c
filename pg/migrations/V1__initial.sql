-- postino's PostgreSQL schema, version 1. Applied once by the migration
-- runner (pg/src/migrate.rs), in one transaction with its row in
-- schema_version. Never edit an applied migration: add V2__….sql.

-- Settings of the store: `uidl_epoch` (random per database, part of every
-- UIDL, kept by export/import).
CREATE TABLE meta (
    name  text PRIMARY KEY,
    value text NOT NULL
);
INSERT INTO meta (name, value)
    VALUES ('uidl_epoch', (floor(random() * 4294967295))::bigint::text);

-- Queue ids, unique across nodes: a node takes a block of ids per nextval
-- (pg/src/ids.rs), so allocating costs one round trip per block.
CREATE SEQUENCE message_ids AS bigint INCREMENT BY 64 START WITH 64;

CREATE TABLE users (
    address text PRIMARY KEY,
    hash    text NOT NULL,
    -- The user's own quota in octets (NULL: `[mailbox] quota` applies;
    -- 9223372036854775807: unlimited).
    quota   bigint
);

CREATE TABLE aliases (
    alias   text PRIMARY KEY,
    targets text[] NOT NULL
);

-- Content shared by several records (a spooled message, a message
-- delivered to several mailboxes), with the number of records holding it.
CREATE TABLE content (
    id   bigint PRIMARY KEY,
    data bytea NOT NULL,
    refs integer NOT NULL CHECK (refs > 0)
);

-- Accepted messages not yet dispatched, and what dispatch has done.
CREATE TABLE inbound (
    id         bigint PRIMARY KEY,
    envelope   jsonb NOT NULL,
    local_done text[] NOT NULL DEFAULT '{}',
    queued     boolean NOT NULL DEFAULT false,
    bounce     bigint
);

-- Mailbox entries; `content` inline for a message delivered to one
-- mailbox only, else NULL and the content is in `content`.
CREATE TABLE mail (
    mailbox text NOT NULL,
    id      bigint NOT NULL,
    prefix  bytea NOT NULL,
    size    bigint NOT NULL,
    content bytea,
    PRIMARY KEY (mailbox, id)
);

-- The remote delivery queue. A node delivering an entry holds a lease on
-- it (`lease_owner` until `lease_until`, unix seconds; `lease_token` tells
-- one claim from the next); an expired lease is claimable by any node. A
-- held entry has `held_since` and is never due.
CREATE TABLE queue (
    id           bigint PRIMARY KEY,
    entry        jsonb NOT NULL,
    next_attempt bigint NOT NULL,
    held_since   bigint,
    content      bytea,
    lease_owner  text,
    lease_until  bigint,
    lease_token  bigint
);
CREATE INDEX queue_due ON queue (next_attempt, id) WHERE held_since IS NULL;

-- Each message's history (`postino trace`): events in the order written.
CREATE TABLE trace (
    id   bigint NOT NULL,
    seq  bigserial,
    at   bigint NOT NULL,
    what jsonb NOT NULL,
    PRIMARY KEY (id, seq)
);
CREATE INDEX trace_at ON trace (at);

-- Claims on queue entries and maildrop locks carry this sequence's values.
CREATE SEQUENCE lease_tokens AS bigint;
