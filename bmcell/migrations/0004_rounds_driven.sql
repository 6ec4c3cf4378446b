-- The rounds service drives only the rounds it started (StartRound). Rows written
-- by other means (fixtures, imports of an earlier study's history) stay as they are.
ALTER TABLE rounds ADD COLUMN driven boolean NOT NULL DEFAULT false;
CREATE INDEX rounds_live ON rounds (state) WHERE driven;
