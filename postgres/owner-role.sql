-- The cluster of an older version of the stack (issue 12): its role mlflow, which the server and
-- migrate connect as, is the bootstrap superuser that initdb made. postgres/entrypoint.sh runs
-- this once, in single-user mode on database mlflow (no socket open, nobody else connected),
-- with exit_on_error: any error ends the process before COMMIT, so nothing is kept and the next
-- start runs it again. On a cluster already in the current layout it changes nothing.
--
-- Afterwards: the bootstrap superuser is named postgres and has no password (pg_hba.conf admits
-- it on the container's local socket only); a new role mlflow, no superuser and no CREATEDB,
-- CREATEROLE, REPLICATION or BYPASSRLS, has the old role's password (its SCRAM verifier, copied:
-- the password file and the server's settings stay as they are) and owns database mlflow and
-- every schema, table, sequence, view, type, routine and large object in it.
--
-- Why this way: PostgreSQL refuses to take SUPERUSER from the bootstrap superuser, to rename the
-- session's own role, and to REASSIGN OWNED away from the bootstrap superuser (its objects are
-- pinned). So a temporary superuser, which exists only inside this transaction, renames it, and
-- each object changes owner by its own ALTER. Single-user mode reads statements ended by a
-- semicolon and an empty line (postgres -j).

BEGIN;

CREATE ROLE mlflow_stack_owner_move SUPERUSER NOLOGIN;

SET SESSION AUTHORIZATION mlflow_stack_owner_move;

DO $owner_role$
DECLARE
    verifier text;
    item record;
    left_over text;
BEGIN
    IF (SELECT rolname FROM pg_catalog.pg_authid WHERE oid = 10) = 'mlflow' THEN
        -- Read before the rename: PostgreSQL clears an MD5 password on a rename.
        SELECT rolpassword INTO verifier FROM pg_catalog.pg_authid WHERE oid = 10;
        ALTER ROLE mlflow RENAME TO postgres;
        ALTER ROLE postgres PASSWORD NULL;
        CREATE ROLE mlflow LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
            INHERIT;
        EXECUTE format('ALTER ROLE mlflow PASSWORD %L', verifier);
        ALTER DATABASE mlflow OWNER TO mlflow;
        FOR item IN SELECT n.oid::regnamespace AS name FROM pg_catalog.pg_namespace n
            WHERE n.nspowner = 10 AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname !~ '^pg_(toast|temp_)' LOOP
            EXECUTE format('ALTER SCHEMA %s OWNER TO mlflow', item.name);
        END LOOP;
        -- Tables, views, materialized views, foreign tables; a table's indexes, TOAST table and
        -- the sequences of its serial and identity columns follow it.
        FOR item IN SELECT c.oid::regclass AS name FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relowner = 10 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname !~ '^pg_(toast|temp_)' LOOP
            EXECUTE format('ALTER TABLE %s OWNER TO mlflow', item.name);
        END LOOP;
        -- Sequences of no column (the others moved above).
        FOR item IN SELECT c.oid::regclass AS name FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relowner = 10 AND c.relkind = 'S'
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname !~ '^pg_(toast|temp_)' LOOP
            EXECUTE format('ALTER SEQUENCE %s OWNER TO mlflow', item.name);
        END LOOP;
        -- Enums, domains, ranges (their multirange follows) and composite types; array types
        -- and a table's row type follow their element or table.
        FOR item IN SELECT t.oid::regtype AS name FROM pg_catalog.pg_type t
            JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
            LEFT JOIN pg_catalog.pg_class c ON c.oid = t.typrelid
            WHERE t.typowner = 10 AND (t.typtype IN ('e', 'd', 'r') OR c.relkind = 'c')
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname !~ '^pg_(toast|temp_)' LOOP
            EXECUTE format('ALTER TYPE %s OWNER TO mlflow', item.name);
        END LOOP;
        FOR item IN SELECT p.oid::regprocedure AS name FROM pg_catalog.pg_proc p
            JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
            WHERE p.proowner = 10 AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname !~ '^pg_(toast|temp_)' LOOP
            EXECUTE format('ALTER ROUTINE %s OWNER TO mlflow', item.name);
        END LOOP;
        FOR item IN SELECT oid FROM pg_catalog.pg_largeobject_metadata WHERE lomowner = 10 LOOP
            EXECUTE format('ALTER LARGE OBJECT %s OWNER TO mlflow', item.oid);
        END LOOP;
    END IF;
    -- Whatever this script does not move (an operator's operator, collation, extension ...) is
    -- refused, and nothing is changed: the superuser would keep owning it.
    SELECT string_agg(kind || ' ' || name, ', ') INTO left_over FROM (
        SELECT 'relation' AS kind, c.oid::regclass::text AS name FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relowner = 10
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname !~ '^pg_(toast|temp_)'
        UNION ALL SELECT 'schema', nspname FROM pg_catalog.pg_namespace WHERE nspowner = 10
            AND nspname NOT IN ('pg_catalog', 'information_schema')
            AND nspname !~ '^pg_(toast|temp_)'
        UNION ALL SELECT 'type', t.oid::regtype::text FROM pg_catalog.pg_type t
            JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace WHERE t.typowner = 10
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname !~ '^pg_(toast|temp_)'
        UNION ALL SELECT 'routine', p.oid::regprocedure::text FROM pg_catalog.pg_proc p
            JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace WHERE p.proowner = 10
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname !~ '^pg_(toast|temp_)'
        UNION ALL SELECT 'operator', o.oid::regoperator::text FROM pg_catalog.pg_operator o
            JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace WHERE o.oprowner = 10
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
        UNION ALL SELECT 'collation', l.oid::regcollation::text FROM pg_catalog.pg_collation l
            JOIN pg_catalog.pg_namespace n ON n.oid = l.collnamespace WHERE l.collowner = 10
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
        UNION ALL SELECT 'extension', extname FROM pg_catalog.pg_extension
            WHERE extowner = 10 AND extname <> 'plpgsql'
        UNION ALL SELECT 'statistics', s.stxname FROM pg_catalog.pg_statistic_ext s
            WHERE s.stxowner = 10
        UNION ALL SELECT 'text search configuration', c.cfgname
            FROM pg_catalog.pg_ts_config c JOIN pg_catalog.pg_namespace n
            ON n.oid = c.cfgnamespace WHERE c.cfgowner = 10 AND n.nspname <> 'pg_catalog'
        UNION ALL SELECT 'large object', oid::text FROM pg_catalog.pg_largeobject_metadata
            WHERE lomowner = 10
    ) owned;
    IF left_over IS NOT NULL THEN
        RAISE EXCEPTION 'these objects in database mlflow are owned by the superuser and '
            'this step does not move them: %', left_over;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'mlflow' AND NOT rolsuper
                   AND oid = (SELECT datdba FROM pg_catalog.pg_database
                              WHERE datname = 'mlflow')) THEN
        RAISE EXCEPTION 'the role mlflow is no unprivileged owner of database mlflow';
    END IF;
END
$owner_role$;

-- The bootstrap superuser, whatever it was called before: the temporary role cannot be dropped
-- while it is the session's.
SET SESSION AUTHORIZATION postgres;

DROP ROLE mlflow_stack_owner_move;

COMMIT;

