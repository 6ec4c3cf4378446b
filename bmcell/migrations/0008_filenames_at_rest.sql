-- Upload filenames often carry patient identifiers (a record number, a name, a date
-- of birth). They are no longer stored as sent unless the lab opts in
-- (labs.keep_filenames, for labs whose clients send names they chose themselves):
-- otherwise a field keeps only a salted digest of its name, enough to tell whether
-- one file name was uploaded twice, never to read it back. The salt is per lab and
-- random, so the same name in two labs digests differently and a digest cannot be
-- looked up in a table of precomputed names.
ALTER TABLE labs ADD COLUMN keep_filenames boolean NOT NULL DEFAULT false;
ALTER TABLE labs ADD COLUMN filename_salt bytea NOT NULL DEFAULT uuid_send(gen_random_uuid());

ALTER TABLE field_images ADD COLUMN filename_sha256 text NOT NULL DEFAULT ''
    CHECK (filename_sha256 = '' OR filename_sha256 ~ '^[0-9a-f]{64}$');

-- Names stored before this migration: digested and cleared (no lab has opted in yet).
UPDATE field_images f
   SET filename_sha256 = encode(sha256(l.filename_salt || convert_to(f.filename, 'UTF8')), 'hex'),
       filename = ''
  FROM labs l
 WHERE l.id = f.lab_id AND f.filename <> '';
