-- The audit trail cannot be edited, and says who acted as they were at the time.
--
-- Actor: a person (their API token), a service account (a 'service' user's token), or
-- a process acting on its own (a service's background work, a CLI with direct database
-- access), named 'service:<name>' or 'cli:<login>'. actor_name and actor_role are copied
-- at write time, so renaming or disabling a user later does not rewrite history;
-- actor_id still joins to users for current details. request_id ties a row to the
-- request that caused it. detail holds what a change has besides before/after (filters
-- of an export, a token's prefix).

ALTER TABLE audit_log
    ADD COLUMN actor_kind text NOT NULL DEFAULT 'process'
        CHECK (actor_kind IN ('person', 'service', 'process')),
    ADD COLUMN actor_name text NOT NULL DEFAULT 'unrecorded',
    ADD COLUMN actor_role text,
    ADD COLUMN request_id text,
    ADD COLUMN detail jsonb;

-- Rows written before this migration: the best knowledge of who they were is now.
UPDATE audit_log a
   SET actor_kind = 'person', actor_name = u.name, actor_role = u.role
  FROM users u
 WHERE u.id = a.actor_id;

CREATE INDEX audit_log_at ON audit_log (at DESC, id DESC);
CREATE INDEX audit_log_actor ON audit_log (actor_name, at DESC);

-- Append-only. A trigger, because the embedded stack (and a deployment whose services
-- own the schema) connects as the table's owner or a superuser, which privileges do
-- not restrict; statement-level, so even a statement that matches no row is refused.
-- A superuser can still drop or disable the trigger: that is DDL, which Postgres logs
-- with log_statement = 'ddl'; the services never issue it.
CREATE FUNCTION audit_log_refuse_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'record a new audit row instead of changing an old one';
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();

-- Deployments where the services connect as a role other than the schema's owner:
-- that role may read and append, never change. Taken from every role holding the
-- privileges now; grant the services role only SELECT, INSERT on audit_log (and
-- USAGE on its sequence) when you create it later.
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM PUBLIC;
DO $$
DECLARE
    grantee_name text;
BEGIN
    FOR grantee_name IN
        SELECT DISTINCT grantee FROM information_schema.role_table_grants
         WHERE table_name = 'audit_log'
           AND privilege_type IN ('UPDATE', 'DELETE', 'TRUNCATE')
           AND grantee <> 'PUBLIC'
           AND grantee <> (SELECT tableowner FROM pg_tables WHERE tablename = 'audit_log')
    LOOP
        EXECUTE format('REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM %I', grantee_name);
    END LOOP;
END
$$;
