-- A reviewer's or admin's sign-off of a specimen's differential count (issue 14).
-- `digest` is the sha256 of the counted state at the time (each counted cell's class
-- and whether a reviewer's label or a prediction gave it), so a report can say the
-- sign-off is stale once a cell, a label or the active model changed. Append-only:
-- the newest row of a specimen is its current sign-off; older ones are its history.
CREATE TABLE report_verifications (
    id             bigserial PRIMARY KEY,
    specimen_id    bigint NOT NULL REFERENCES specimens (id),
    verified_by    bigint NOT NULL REFERENCES users (id),
    verified_at    timestamptz NOT NULL DEFAULT now(),
    model_name     text NOT NULL,
    model_version  integer NOT NULL,
    digest         text NOT NULL CHECK (digest ~ '^[0-9a-f]{64}$'),
    counts         jsonb NOT NULL
);
CREATE INDEX report_verifications_specimen ON report_verifications (specimen_id, verified_at DESC, id DESC);
