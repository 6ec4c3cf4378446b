-- A reviewer's skips (issue 19): releasing a task unanswered from the reviewer's page
-- puts it behind the rest of the queue for that reviewer, so their next lease moves
-- on, while everyone else gets it in its usual order. One row per (task, reviewer).
CREATE TABLE review_skips (
    task_id     bigint NOT NULL REFERENCES review_tasks (id) ON DELETE CASCADE,
    reviewer_id bigint NOT NULL REFERENCES users (id),
    skipped_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, reviewer_id)
);

-- Micrometres per pixel of a field, when the uploader states it (UploadHeader.um_per_px):
-- the reviewer's page draws a scale bar from it and says "scale unknown" without it.
ALTER TABLE field_images ADD COLUMN um_per_px real CHECK (um_per_px > 0 AND um_per_px < 100);
