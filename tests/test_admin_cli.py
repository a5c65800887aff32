"""``stdaemon-admin`` as operators run it: a real subprocess, next to a running daemon."""

from __future__ import annotations

import configparser
import json
import os
import sqlite3
import sys

import pytest_twisted
from twisted.internet import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _insert(conn, ids):
    for i in ids:
        conn.execute(
            "INSERT INTO jobs (job_id, provider, status, created_at) VALUES (?, 'replicate', 'completed', ?)",
            (f"job-{i:04d}", float(i)),
        )


def _job_ids(conn):
    return [r[0] for r in conn.execute("SELECT job_id FROM jobs ORDER BY job_id")]


async def run_cli(daemon, *argv):
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(daemon.tmp_path),
        "PYTHONPATH": ROOT,
        "SIMPLETUNER_STATE_DIR": daemon.ctx.state_dir,
    }
    config = daemon.ctx.config.config_file
    args = ["-m", "stdaemon.admin_cli", "--config", config, *argv]
    out, err, code = await utils.getProcessOutputAndValue(sys.executable, args, env=env, path=ROOT)
    return code, out.decode(), err.decode()


def test_console_script_is_registered():
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    scripts = parser["options.entry_points"]["console_scripts"]
    assert "stdaemon-admin = stdaemon.admin_cli:main" in scripts


@pytest_twisted.ensureDeferred
async def test_cli_backup_list_info_and_restore_next_to_the_running_daemon(daemon):
    ctx = daemon.ctx
    await ctx.db.run_write(_insert, range(6))

    code, out, err = await run_cli(daemon, "--json", "backup")
    assert code == 0, err
    assert "warning" not in err, err
    entry = json.loads(out)
    assert entry["name"].startswith("jobs_backup_") and os.path.isfile(entry["path"])
    assert os.path.dirname(entry["path"]) == str(ctx.backups.store.backup_dir)  # same dir as the daemon

    code, out, err = await run_cli(daemon, "--json", "db-info")
    assert code == 0, err
    info = json.loads(out)
    assert info["job_count"] == 6 and info["path"] == ctx.database_path

    code, out, err = await run_cli(daemon, "--json", "list-backups")
    assert code == 0, err
    assert [b["name"] for b in json.loads(out)["backups"]] == [entry["name"]]
    code, out2, err = await run_cli(daemon, "list-backups", "--json")  # either order
    assert code == 0, err
    assert json.loads(out2) == json.loads(out)

    code, out, err = await run_cli(daemon, "list-backups")
    assert code == 0 and entry["name"] in out

    # The daemon changes its jobs; the CLI restores the backup while it runs.
    await ctx.db.run_write(_insert, range(6, 20))
    code, out, err = await run_cli(daemon, "--json", "restore", entry["name"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["job_count"] == 6 and os.path.isfile(summary["safety_copy"])
    assert await ctx.db.run_read(_job_ids) == [f"job-{i:04d}" for i in range(6)]
    await ctx.db.run_write(_insert, [50])  # and the daemon keeps writing
    assert len(await ctx.db.run_read(_job_ids)) == 7

    # Both operations are in the daemon's audit log, written with the daemon's key.
    created = (await ctx.audit.query(event_type="backup.created"))["entries"]
    restored = (await ctx.audit.query(event_type="backup.restored"))["entries"]
    assert [e["target"] for e in created] == [entry["path"]]
    assert len(restored) == 1 and restored[0]["actor"].startswith("cli:")
    assert restored[0]["details"]["via"] == "cli"
    verdict = await ctx.audit.verify()
    assert verdict["valid"] is True, verdict


@pytest_twisted.ensureDeferred
async def test_cli_refuses_a_foreign_file_with_exit_3(daemon):
    foreign = os.path.join(str(daemon.tmp_path), "foreign.db")
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    await daemon.ctx.db.run_write(_insert, range(2))
    code, out, err = await run_cli(daemon, "restore", foreign)
    assert code == 3
    assert "foreign_database" in err
    assert len(await daemon.ctx.db.run_read(_job_ids)) == 2


@pytest_twisted.ensureDeferred
async def test_cli_custom_path_and_usage_errors(daemon):
    target = os.path.join(str(daemon.tmp_path), "nightly.db.gz")
    code, out, err = await run_cli(daemon, "backup", "--path", target)
    assert code == 0, err
    assert "Backup created" in out and os.path.isfile(target)
    code, out, err = await run_cli(daemon, "frobnicate")
    assert code == 2
