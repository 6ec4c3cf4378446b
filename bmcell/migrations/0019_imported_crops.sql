-- Labelled crops brought in from outside (issue 15: `bmcell import`): a cell that
-- arrives as a single-cell image skips segmentation, so it has no field. Its bbox is
-- the crop frame itself and its mask the frame's image area (the padding left out).
-- ``import_sha256`` is the sha256 of the file as sent: the same file imported again
-- into the same specimen is the same cell (re-import is a no-op).
ALTER TABLE cells ALTER COLUMN field_id DROP NOT NULL;
ALTER TABLE cells ALTER COLUMN index_in_field DROP NOT NULL;
ALTER TABLE cells ADD COLUMN import_sha256 text
    CHECK (import_sha256 IS NULL OR import_sha256 ~ '^[0-9a-f]{64}$');
ALTER TABLE cells ADD CONSTRAINT cells_field_or_import
    CHECK ((field_id IS NULL) = (import_sha256 IS NOT NULL)
           AND (field_id IS NULL) = (index_in_field IS NULL));
CREATE UNIQUE INDEX cells_import ON cells (specimen_id, import_sha256)
    WHERE import_sha256 IS NOT NULL;

ALTER TABLE labels DROP CONSTRAINT labels_source_check;
ALTER TABLE labels ADD CONSTRAINT labels_source_check
    CHECK (source IN ('initial', 'cst', 'al', 'st', 'test', 'validation', 'random', 'import'));
