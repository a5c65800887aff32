"""Schema migrations, applied in order on the writer connection at start-up.

Each migration has a unique name and is applied once, inside one
transaction, and recorded in ``schema_migrations``.  To change the schema,
append a new ``(name, sql)`` entry; never edit an applied one.  The schema
version reported by ``get_database_info()`` is the number of applied
migrations.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_core",
        """
        CREATE TABLE users (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            username TEXT NOT NULL UNIQUE,
            email TEXT UNIQUE,
            password_hash TEXT,
            role TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
            created_at REAL NOT NULL,
            disabled INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE api_keys (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
            created_at REAL NOT NULL,
            expires_at REAL,
            revoked_at REAL,
            last_used_at REAL
        );
        CREATE TABLE settings (
            namespace TEXT NOT NULL,
            key TEXT NOT NULL,
            value_json TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (namespace, key)
        );
        CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY,
            provider TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'pending_approval', 'uploading',
                'queued', 'running', 'completed', 'failed', 'cancelled')),
            config_name TEXT,
            created_at REAL NOT NULL,
            started_at REAL,
            completed_at REAL,
            cost_usd REAL NOT NULL DEFAULT 0,
            hardware_type TEXT,
            error_message TEXT,
            output_url TEXT,
            user_id INTEGER,
            metadata TEXT NOT NULL DEFAULT '{}',
            external_id TEXT,
            idempotency_key TEXT
        );
        CREATE INDEX jobs_status ON jobs(status);
        CREATE INDEX jobs_provider_created ON jobs(provider, created_at);
        CREATE INDEX jobs_created ON jobs(created_at);
        CREATE UNIQUE INDEX jobs_external ON jobs(provider, external_id)
            WHERE external_id IS NOT NULL;
        CREATE UNIQUE INDEX jobs_idempotency ON jobs(user_id, idempotency_key)
            WHERE idempotency_key IS NOT NULL;
        """,
    ),
    (
        "0009_sessions_approvals_quotas",
        """
        CREATE TABLE sessions (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            token_hash TEXT NOT NULL UNIQUE,
            csrf_hash TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            ip TEXT,
            user_agent TEXT
        );
        CREATE INDEX sessions_expires ON sessions(expires_at);
        CREATE INDEX sessions_user ON sessions(user_id);
        CREATE TABLE approval_rules (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            condition TEXT NOT NULL CHECK (condition IN ('cost_exceeds', 'hardware_profile')),
            value_json TEXT NOT NULL,
            created_at REAL NOT NULL,
            created_by TEXT
        );
        CREATE TABLE approval_requests (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL UNIQUE,
            provider TEXT,
            user_id INTEGER,
            username TEXT,
            rule_id INTEGER,
            rule_name TEXT,
            reason TEXT,
            estimate_usd REAL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'rejected', 'expired')),
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            decided_at REAL,
            decided_by TEXT,
            decision_reason TEXT,
            details_json TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX approval_requests_status ON approval_requests(status, expires_at);
        CREATE TABLE quotas (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            quota_type TEXT NOT NULL CHECK (quota_type IN ('concurrent_jobs', 'daily_cost_usd',
                'monthly_cost_usd')),
            limit_value REAL NOT NULL,
            action TEXT NOT NULL CHECK (action IN ('block', 'warn')),
            user_id INTEGER,
            role TEXT CHECK (role IS NULL OR role IN ('admin', 'operator', 'viewer')),
            created_at REAL NOT NULL,
            created_by TEXT
        );
        """,
    ),
    (
        "0020_upload_credentials",
        """
        CREATE TABLE upload_credentials (
            access_key_id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL,
            bucket TEXT NOT NULL,
            prefix TEXT NOT NULL,
            secret_enc BLOB NOT NULL,
            secret_hash TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            revoked_at REAL
        );
        CREATE INDEX upload_credentials_job ON upload_credentials (job_id);
        """,
    ),
    (
        "0030_audit",
        """
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            timestamp REAL NOT NULL,
            event_type TEXT NOT NULL,
            actor TEXT NOT NULL,
            ip TEXT,
            target TEXT,
            action TEXT,
            details TEXT NOT NULL DEFAULT 'null',
            previous_hash TEXT NOT NULL,
            entry_hash TEXT NOT NULL
        );
        CREATE INDEX audit_log_timestamp ON audit_log (timestamp);
        CREATE INDEX audit_log_event_type ON audit_log (event_type, id);
        CREATE INDEX audit_log_actor ON audit_log (actor, id);
        CREATE TABLE audit_anchor (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            last_id INTEGER NOT NULL,
            last_hash TEXT NOT NULL,
            pruned_total INTEGER NOT NULL,
            updated_at REAL NOT NULL,
            anchor_hash TEXT NOT NULL
        );
        """,
    ),
    (
        "0031_webhook_deliveries",
        """
        CREATE TABLE webhook_deliveries (
            provider TEXT NOT NULL,
            webhook_id TEXT NOT NULL,
            received_at REAL NOT NULL,
            job_id TEXT,
            outcome TEXT NOT NULL,
            PRIMARY KEY (provider, webhook_id)
        );
        CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at);
        """,
    ),
    (
        "0042_users_display_name",
        """
        ALTER TABLE users ADD COLUMN display_name TEXT;
        """,
    ),
    (
        # A console session opened with an API key ("Sign in with API key") keeps
        # that key's role as its ceiling and ends when the key is revoked.
        "0043_session_api_key",
        """
        ALTER TABLE sessions ADD COLUMN key_id INTEGER REFERENCES api_keys(id);
        """,
    ),
    (
        # A quota may hold a submission for approval (SimpleTuner's action
        # ``require_approval``); SQLite cannot alter a CHECK, so the table is rebuilt.
        "0044_quota_require_approval",
        """
        CREATE TABLE quotas_new (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            quota_type TEXT NOT NULL CHECK (quota_type IN ('concurrent_jobs', 'daily_cost_usd',
                'monthly_cost_usd')),
            limit_value REAL NOT NULL,
            action TEXT NOT NULL CHECK (action IN ('block', 'warn', 'require_approval')),
            user_id INTEGER,
            role TEXT CHECK (role IS NULL OR role IN ('admin', 'operator', 'viewer')),
            created_at REAL NOT NULL,
            created_by TEXT
        );
        INSERT INTO quotas_new (id, quota_type, limit_value, action, user_id, role, created_at, created_by)
            SELECT id, quota_type, limit_value, action, user_id, role, created_at, created_by FROM quotas;
        DROP TABLE quotas;
        ALTER TABLE quotas_new RENAME TO quotas;
        """,
    ),
    (
        # Counters bumped by triggers whoever writes (this daemon, another instance on the same
        # database, stdaemon-admin): ``auth`` by every change that can withdraw a key's rights,
        # ``jobs`` by every job row change. What the daemon keeps in memory (verified keys, hot job
        # rows) is checked against them by one cheap read a second (``change-counters`` timer).
        "0045_change_counters",
        """
        CREATE TABLE change_counters (
            name TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        );
        INSERT INTO change_counters (name, value) VALUES ('auth', 0), ('jobs', 0);
        CREATE TRIGGER change_counters_key_update
            AFTER UPDATE OF revoked_at, role, expires_at, user_id, key_hash ON api_keys
            BEGIN UPDATE change_counters SET value = value + 1 WHERE name = 'auth'; END;
        CREATE TRIGGER change_counters_key_delete AFTER DELETE ON api_keys
            BEGIN UPDATE change_counters SET value = value + 1 WHERE name = 'auth'; END;
        CREATE TRIGGER change_counters_user_update
            AFTER UPDATE OF role, disabled, username ON users
            BEGIN UPDATE change_counters SET value = value + 1 WHERE name = 'auth'; END;
        CREATE TRIGGER change_counters_user_delete AFTER DELETE ON users
            BEGIN UPDATE change_counters SET value = value + 1 WHERE name = 'auth'; END;
        CREATE TRIGGER change_counters_job_insert AFTER INSERT ON jobs
            BEGIN UPDATE change_counters SET value = value + 1 WHERE name = 'jobs'; END;
        CREATE TRIGGER change_counters_job_update AFTER UPDATE ON jobs
            BEGIN UPDATE change_counters SET value = value + 1 WHERE name = 'jobs'; END;
        CREATE TRIGGER change_counters_job_delete AFTER DELETE ON jobs
            BEGIN UPDATE change_counters SET value = value + 1 WHERE name = 'jobs'; END;
        """,
    ),
]


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations; return the schema version."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " name TEXT PRIMARY KEY, applied_at TEXT NOT NULL DEFAULT (datetime('now')))"
    )
    applied = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
    for name, sql in MIGRATIONS:
        if name in applied:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # executescript would COMMIT the open transaction first; run the
            # statements one by one so the migration is atomic.
            for statement in _split(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (name) VALUES (?)", (name,))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return schema_version(conn)


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0]


def known_migrations() -> list[str]:
    return [name for name, _ in MIGRATIONS]


def _split(sql: str) -> list[str]:
    statements, current = [], []
    for line in sql.splitlines():
        current.append(line)
        candidate = "\n".join(current).strip()
        if candidate.endswith(";") and sqlite3.complete_statement(candidate):
            statements.append(candidate)
            current = []
    rest = "\n".join(current).strip()
    if rest:
        statements.append(rest)
    return statements
