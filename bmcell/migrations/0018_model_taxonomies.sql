-- A lab's own taxonomy per model name (issue 15): every load adds a version; the
-- latest is the model's taxonomy (bmcell.taxonomy.for_model), the study's 17 classes
-- when none is stored. A new version may only append classes (checked in Python).
CREATE TABLE model_taxonomies (
    model_name  text NOT NULL,
    version     integer NOT NULL CHECK (version > 0),
    taxonomy    jsonb NOT NULL,
    loaded_by   text NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_name, version)
);
