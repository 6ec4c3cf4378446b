-- A bootstrap's labelling waves are numbered on the round, and the wave and its state
-- change commit together: a driver that dies between them repeats neither.
-- short_classes: classes the bootstrap could not bring to their quota.
-- failed_step: the state a failed round was in, where RetryRound starts it again
-- (NULL where retrying cannot help, e.g. a missed 0.80 gate).
ALTER TABLE rounds
    ADD COLUMN waves integer NOT NULL DEFAULT 0 CHECK (waves >= 0),
    ADD COLUMN short_classes text[] NOT NULL DEFAULT '{}',
    ADD COLUMN failed_step text
        CHECK (failed_step IN ('created', 'predicting', 'selecting', 'reviewing',
                               'training', 'evaluating'));

-- Rounds mid-bootstrap keep their count: a wave's tasks share one created_at.
UPDATE rounds r SET waves = (
    SELECT count(DISTINCT t.created_at) FROM review_tasks t
     WHERE t.round_id = r.id AND t.kind IN ('initial', 'test'))
 WHERE r.strategy = 'bootstrap';

-- Failed rounds before this migration: the driver's messages begin with the step.
UPDATE rounds SET failed_step = split_part(message, ' ', 1)
 WHERE state = 'failed'
   AND split_part(message, ' ', 1) IN ('created', 'predicting', 'selecting', 'reviewing',
                                       'training', 'evaluating');

-- Labels count per experiment: a label's round says whose it is.
CREATE INDEX labels_round ON labels (round_id);
