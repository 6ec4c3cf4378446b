-- Labeling API: when a lease began, so a review's time (reviews.seconds, the review
-- time histogram) is measured by the server rather than trusted from the client.
ALTER TABLE review_tasks ADD COLUMN leased_at timestamptz;

-- Revocation by prefix (`bmcell users revoke --token-prefix`) and token listings.
CREATE INDEX api_tokens_prefix ON api_tokens (prefix);
