-- Service accounts: one user per service (role 'service'), whose token the service
-- sends on every call to another service. Like operators and admins it sees every
-- lab, so it needs no user_labs rows; what it may call is bmcell.policy's table.
ALTER TABLE users DROP CONSTRAINT users_role_check;
ALTER TABLE users ADD CONSTRAINT users_role_check
    CHECK (role IN ('uploader', 'reviewer', 'operator', 'admin', 'service'));
