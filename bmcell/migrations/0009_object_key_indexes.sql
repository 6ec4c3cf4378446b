-- Storage integrity (issue 16): `bmcell storage check` and a duplicate upload ask
-- "does any row still use this object?" by key, once per object in doubt.
CREATE INDEX cells_crop_key ON cells (crop_key);
CREATE INDEX cells_mask_key ON cells (mask_key);
CREATE INDEX field_images_object_key ON field_images (object_key);
