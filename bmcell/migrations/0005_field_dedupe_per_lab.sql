-- Field images are deduplicated within a lab, never across labs: the same bytes
-- uploaded to two labs are two fields, each with its own cells, so an upload never
-- learns that another lab holds the image. (Objects stay shared: they are content
-- addressed.) field_images gets its lab, always its specimen's lab, and the unique
-- key becomes (lab_id, sha256).
ALTER TABLE field_images ADD COLUMN lab_id bigint;
UPDATE field_images f SET lab_id = s.lab_id FROM specimens s WHERE s.id = f.specimen_id;
ALTER TABLE field_images ALTER COLUMN lab_id SET NOT NULL;

ALTER TABLE specimens ADD CONSTRAINT specimens_id_lab_id_key UNIQUE (id, lab_id);
ALTER TABLE field_images ADD CONSTRAINT field_images_specimen_lab_fkey
    FOREIGN KEY (specimen_id, lab_id) REFERENCES specimens (id, lab_id);

-- A writer that names only the specimen (fixtures, imports) gets the specimen's lab.
CREATE FUNCTION field_images_fill_lab() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.lab_id IS NULL THEN
        SELECT s.lab_id INTO NEW.lab_id FROM specimens s WHERE s.id = NEW.specimen_id;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER field_images_fill_lab BEFORE INSERT ON field_images
    FOR EACH ROW EXECUTE FUNCTION field_images_fill_lab();

ALTER TABLE field_images DROP CONSTRAINT field_images_sha256_key;
ALTER TABLE field_images ADD CONSTRAINT field_images_lab_id_sha256_key UNIQUE (lab_id, sha256);
-- Lookups by digest alone (placing synthetic truth: bmcell.review_sim) keep an index.
CREATE INDEX field_images_sha256 ON field_images (sha256);
