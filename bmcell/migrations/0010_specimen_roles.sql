-- Specimens as managed resources (issue 14): a specimen's role says what its cells are
-- for. training: sampled, labelled and trained on; test: the held-out test split only
-- (never trained on); excluded: neither (a bad smear, a withdrawn consent), so its
-- cells are never sampled, trained on or tested on. An operator sets it at upload or
-- later (`bmcell specimens set-role`), audited.
ALTER TABLE specimens ADD COLUMN role text NOT NULL DEFAULT 'training'
    CHECK (role IN ('training', 'test', 'excluded'));
UPDATE specimens SET role = 'test' WHERE is_test;

-- is_test stays readable, derived from the role, so existing reads keep working; it
-- can no longer be written (the role is the one place the fact lives).
ALTER TABLE specimens DROP COLUMN is_test;
ALTER TABLE specimens ADD COLUMN is_test boolean GENERATED ALWAYS AS (role = 'test') STORED;
