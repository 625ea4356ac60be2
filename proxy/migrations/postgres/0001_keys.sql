-- API keys (docs/keys-and-limits.md). A key is never stored: only its SHA-256 (hex)
-- and a short display prefix. A NULL limit means no limit. models is a JSON array of
-- model names, empty for every model. metadata is free-form JSON.
CREATE TABLE api_keys (
    id text PRIMARY KEY,
    name text NOT NULL,
    prefix text NOT NULL,
    key_hash text NOT NULL UNIQUE,
    rpm integer CHECK (rpm > 0),
    tpm bigint CHECK (tpm > 0),
    max_parallel integer CHECK (max_parallel > 0),
    models jsonb NOT NULL DEFAULT '[]',
    expires_at timestamptz,
    revoked boolean NOT NULL DEFAULT false,
    metadata jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
