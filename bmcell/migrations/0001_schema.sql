-- bmcell schema v1.
-- Who may see what is decided by lab; every row that holds a cell's data reaches its
-- lab through specimens. Check constraints and unique keys make bad states and
-- duplicate work impossible rather than merely unlikely.

CREATE TABLE labs (
    id          bigserial PRIMARY KEY,
    code        text NOT NULL UNIQUE CHECK (code ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    name        text NOT NULL DEFAULT '',
    settings    jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE specimens (
    id          bigserial PRIMARY KEY,
    lab_id      bigint NOT NULL REFERENCES labs (id),
    code        text NOT NULL CHECK (code ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    diagnosis   text NOT NULL DEFAULT '',
    -- Test specimens are never used for training (the study's test set).
    is_test     boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (lab_id, code)
);

CREATE TABLE users (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    role        text NOT NULL CHECK (role IN ('uploader', 'reviewer', 'operator', 'admin')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    disabled_at timestamptz
);

-- Labs a user may see; operators and admins see every lab and need no rows here.
CREATE TABLE user_labs (
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    lab_id      bigint NOT NULL REFERENCES labs (id),
    PRIMARY KEY (user_id, lab_id)
);

CREATE TABLE api_tokens (
    id          bigserial PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- sha256 of the secret; the secret itself is shown once and never stored.
    token_hash  bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    prefix      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz
);

CREATE TABLE field_images (
    id           bigserial PRIMARY KEY,
    specimen_id  bigint NOT NULL REFERENCES specimens (id),
    -- Content address of the uploaded bytes: the same file twice is one field.
    sha256       char(64) NOT NULL UNIQUE CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    object_key   text NOT NULL,
    filename     text NOT NULL DEFAULT '',
    format       text NOT NULL CHECK (format IN ('PNG', 'JPEG', 'TIFF')),
    width        integer NOT NULL CHECK (width > 0),
    height       integer NOT NULL CHECK (height > 0),
    size_bytes   bigint NOT NULL CHECK (size_bytes > 0),
    segmenter    text NOT NULL DEFAULT '',
    uploaded_by  bigint REFERENCES users (id),
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX field_images_specimen ON field_images (specimen_id);

CREATE TABLE cells (
    id                   bigserial PRIMARY KEY,
    field_id             bigint NOT NULL REFERENCES field_images (id),
    specimen_id          bigint NOT NULL REFERENCES specimens (id),
    lab_id               bigint NOT NULL REFERENCES labs (id),
    index_in_field       integer NOT NULL CHECK (index_in_field >= 0),
    x0 integer NOT NULL, y0 integer NOT NULL, x1 integer NOT NULL, y1 integer NOT NULL,
    crop_key             text NOT NULL,
    mask_key             text NOT NULL,
    cell_area            real NOT NULL CHECK (cell_area > 0),
    nucleus_area         real NOT NULL CHECK (nucleus_area >= 0),
    nucleus_cell_ratio   real NOT NULL CHECK (nucleus_cell_ratio BETWEEN 0 AND 1),
    nucleus_axis_ratio   real NOT NULL CHECK (nucleus_axis_ratio >= 1 OR nucleus_area = 0),
    nucleus_width_ratio  real NOT NULL CHECK (nucleus_width_ratio BETWEEN 0 AND 1),
    touches_border       boolean NOT NULL,
    -- unlabelled: in the pool; pending: has an open review task; labelled: has a label;
    -- difficult: a reviewer said "too difficult" (never sampled again);
    -- excluded: cut by the border or otherwise unusable.
    status               text NOT NULL DEFAULT 'unlabelled'
                         CHECK (status IN ('unlabelled', 'pending', 'labelled', 'difficult', 'excluded')),
    created_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (field_id, index_in_field),
    CHECK (x1 > x0 AND y1 > y0),
    CHECK (NOT touches_border OR status = 'excluded')
);
CREATE INDEX cells_pool ON cells (lab_id, status);
CREATE INDEX cells_specimen ON cells (specimen_id);

CREATE TABLE model_versions (
    id                  bigserial PRIMARY KEY,
    model_name          text NOT NULL,
    version             integer NOT NULL CHECK (version > 0),
    state               text NOT NULL DEFAULT 'registered'
                        CHECK (state IN ('registered', 'active', 'retired', 'rejected')),
    input_size          integer NOT NULL CHECK (input_size > 0),
    taxonomy            jsonb NOT NULL,
    round_id            bigint,
    validation_accuracy real,
    test_accuracy       real,
    metrics             jsonb NOT NULL DEFAULT '{}',
    confusion_key       text,
    note                text NOT NULL DEFAULT '',
    created_at          timestamptz NOT NULL DEFAULT now(),
    activated_at        timestamptz,
    UNIQUE (model_name, version)
);
-- At most one served version per model.
CREATE UNIQUE INDEX model_versions_one_active ON model_versions (model_name) WHERE state = 'active';

CREATE TABLE rounds (
    id             bigserial PRIMARY KEY,
    experiment     text NOT NULL DEFAULT 'main',
    number         integer NOT NULL CHECK (number >= 0),
    strategy       text NOT NULL
                   CHECK (strategy IN ('bootstrap', 'cst', 'al', 'cst+al', 'st', 'random',
                                       'least_confidence', 'entropy')),
    state          text NOT NULL DEFAULT 'created'
                   CHECK (state IN ('created', 'predicting', 'selecting', 'reviewing',
                                    'training', 'evaluating', 'published', 'failed')),
    params         jsonb NOT NULL DEFAULT '{}',
    model_in       integer,
    model_out      integer,
    message        text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (experiment, number)
);
ALTER TABLE model_versions ADD FOREIGN KEY (round_id) REFERENCES rounds (id);

-- The record of a round's selection: one per round, so selecting twice is a no-op.
CREATE TABLE selections (
    round_id         bigint PRIMARY KEY REFERENCES rounds (id),
    strategy         text NOT NULL,
    seed             bigint NOT NULL,
    pool_size        integer NOT NULL CHECK (pool_size >= 0),
    sample_size      integer NOT NULL CHECK (sample_size >= 0),
    model_version    integer NOT NULL,
    params           jsonb NOT NULL,
    counts_by_kind   jsonb NOT NULL,
    counts_by_class  jsonb NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE predictions (
    cell_id        bigint NOT NULL REFERENCES cells (id),
    model_name     text NOT NULL,
    model_version  integer NOT NULL,
    probabilities  real[] NOT NULL,
    top1           smallint NOT NULL CHECK (top1 >= 0),
    p1             real NOT NULL CHECK (p1 BETWEEN 0 AND 1),
    margin         real NOT NULL CHECK (margin BETWEEN 0 AND 1),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cell_id, model_name, model_version)
);

CREATE TABLE review_tasks (
    id                bigserial PRIMARY KEY,
    round_id          bigint REFERENCES rounds (id),
    cell_id           bigint NOT NULL REFERENCES cells (id),
    -- cst: confirm or correct a confident suggestion; al: label an uncertain cell;
    -- initial/validation/test: bootstrap labelling; adjudication: settle a disagreement.
    kind              text NOT NULL
                      CHECK (kind IN ('cst', 'al', 'initial', 'validation', 'test', 'adjudication')),
    suggested_class   text,
    top_classes       text[] NOT NULL DEFAULT '{}',
    top_probabilities real[] NOT NULL DEFAULT '{}',
    required_reviews  smallint NOT NULL DEFAULT 1 CHECK (required_reviews BETWEEN 1 AND 9),
    state             text NOT NULL DEFAULT 'open'
                      CHECK (state IN ('open', 'leased', 'done', 'cancelled')),
    lease_owner       bigint REFERENCES users (id),
    lease_token       uuid,
    lease_expires_at  timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    done_at           timestamptz,
    CHECK ((state = 'leased') = (lease_token IS NOT NULL AND lease_owner IS NOT NULL
                                 AND lease_expires_at IS NOT NULL)),
    CHECK (kind <> 'cst' OR suggested_class IS NOT NULL)
);
-- A cell is asked about at most once per round, and never twice at the same time.
CREATE UNIQUE INDEX review_tasks_once_per_round ON review_tasks (round_id, cell_id)
    WHERE round_id IS NOT NULL AND kind <> 'adjudication';
CREATE UNIQUE INDEX review_tasks_one_open ON review_tasks (cell_id)
    WHERE state IN ('open', 'leased') AND kind <> 'adjudication';
CREATE INDEX review_tasks_queue ON review_tasks (state, kind, id);

-- One reviewer's answer to a task; several for tasks needing agreement.
CREATE TABLE reviews (
    id           bigserial PRIMARY KEY,
    task_id      bigint NOT NULL REFERENCES review_tasks (id),
    reviewer_id  bigint NOT NULL REFERENCES users (id),
    lease_token  uuid NOT NULL UNIQUE,
    answer       text NOT NULL CHECK (answer IN ('confirm', 'correct', 'difficult')),
    class_code   text,
    seconds      real,
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task_id, reviewer_id),
    CHECK ((answer = 'difficult') = (class_code IS NULL))
);

-- The current label of a cell; its history is in audit_log.
CREATE TABLE labels (
    cell_id      bigint PRIMARY KEY REFERENCES cells (id),
    class_code   text NOT NULL,
    source       text NOT NULL
                 CHECK (source IN ('initial', 'cst', 'al', 'st', 'test', 'validation', 'random')),
    round_id     bigint REFERENCES rounds (id),
    -- Round whose training first uses this label (newest-first retention).
    round_added  integer NOT NULL DEFAULT 0 CHECK (round_added >= 0),
    labelled_by  bigint REFERENCES users (id),
    task_id      bigint REFERENCES review_tasks (id),
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX labels_source ON labels (source, class_code);

CREATE TABLE training_jobs (
    id                text PRIMARY KEY,
    round_id          bigint REFERENCES rounds (id),
    state             text NOT NULL DEFAULT 'queued'
                      CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    config            jsonb NOT NULL,
    epoch             integer NOT NULL DEFAULT 0,
    epochs            integer NOT NULL CHECK (epochs > 0),
    history           jsonb NOT NULL DEFAULT '[]',
    model_version     integer,
    published         boolean NOT NULL DEFAULT false,
    message           text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
-- One live job per round: a restarted trainer finds and resumes it.
CREATE UNIQUE INDEX training_jobs_one_live ON training_jobs (round_id)
    WHERE state IN ('queued', 'running');

CREATE TABLE audit_log (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor_id   bigint REFERENCES users (id),
    action     text NOT NULL,
    entity     text NOT NULL,
    entity_id  text NOT NULL,
    before     jsonb,
    after      jsonb
);
CREATE INDEX audit_log_entity ON audit_log (entity, entity_id);
