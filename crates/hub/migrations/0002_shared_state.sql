-- storehub schema 2: state the replicas share besides the data, written whole under a
-- version check (the PKI's issued certificates, devices and enrollment tokens: 'pki').

CREATE TABLE hub_state (
    name    text COLLATE "C" PRIMARY KEY,
    version bigint NOT NULL,
    value   bytea NOT NULL
);
