"""Per-study jobs decided once across the nodes of a shared index (its catalog database).

A study whose associations landed on several nodes is one study: its scan
sheet and its study-complete hooks are decided once, by the node that holds
the study's job. The jobs are a plain PostgreSQL table in the database of
``database.catalog`` (beside DuckLake's own tables), reached through DuckDB's
postgres extension, which the lake loads already. One row per study:

- every node's post-store stage touches it for the instances it stored,
  with the latest one's receipt time (``touched``: node -> microseconds on
  that node's clock, as its index rows have it): ``quiet_at`` becomes the
  catalog's clock plus ``scansheet.study_timeout`` (the latest wins),
  ``version`` counts the touches. A touch of instances that the last
  finished job already read from the index (``covered``: node -> the
  latest receipt of its rows then) changes nothing: a post-store stage
  that lags behind its node's indexer (it runs at idle priority) does not
  make the study due again;
- once ``quiet_at`` has passed, one node takes it: an UPDATE of a row chosen
  ``FOR UPDATE SKIP LOCKED`` (PostgreSQL's row lock decides, however many
  nodes ask at once) that names the node ``holder`` with a lease;
- the holder renews the lease while it works, and finishes with what it
  read: a row touched meanwhile with instances it did not read is due again
  (the sheet is remade, as on one node). A node that dies stops renewing, and once its lease has
  run out another node takes the job.

One clock (the catalog's) judges quiet and leases, so the nodes' clocks
need not agree. Study UIDs come from peers: they reach SQL only as quoted
literals (:func:`pg_text`).
"""

from __future__ import annotations

import json
import logging
import time

import duckdb

log = logging.getLogger("fastscp.jobs")

#: The catalog database, as this module's DuckDB connection names it.
ALIAS = "fastscp_catalog"
JOBS = "fastscp_study_jobs"
#: Studies per touch statement.
TOUCH_BATCH = 1000
#: A finished job's row is forgotten after this (a study resent later starts a new one).
KEEP_DONE = "30 days"

_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {JOBS} ("
    " study_instance_uid text PRIMARY KEY,"
    " quiet_at timestamptz NOT NULL,"  # due: the last touch plus scansheet.study_timeout
    " version bigint NOT NULL DEFAULT 1,"  # touches so far
    " done_version bigint NOT NULL DEFAULT 0,"  # the version the last finished job covered
    " holder text,"  # the node working on it
    " lease_until timestamptz,"
    " held_version bigint,"
    " done_at timestamptz,"
    " done_by text,"
    " taken_from text,"  # the holder whose lease ran out, at a takeover
    " touched jsonb NOT NULL DEFAULT '{}',"  # node -> the latest receipt (us, its clock) it touched
    " covered jsonb NOT NULL DEFAULT '{}')",  # node -> the latest receipt of its rows the last job read
    f"CREATE INDEX IF NOT EXISTS {JOBS}_due ON {JOBS} (quiet_at) WHERE version > done_version",
    f"CREATE INDEX IF NOT EXISTS {JOBS}_held ON {JOBS} (holder) WHERE holder IS NOT NULL",
)
#: Attempts to make the tables: nodes that start together race (PostgreSQL's
#: CREATE ... IF NOT EXISTS is not safe against a concurrent one).
SCHEMA_ATTEMPTS = 5


def pg_text(text: str) -> str:
    """A PostgreSQL (and DuckDB) string literal: standard_conforming_strings, so only ' is doubled."""
    return "'" + text.replace("'", "''") + "'"


def _seconds(value: float) -> str:
    return f"make_interval(secs => {float(value)!r})"


def _receipts(latest: dict[str, int]) -> str:
    """node -> microseconds as a jsonb literal (node names: config server.node, [A-Za-z0-9_.-])."""
    return pg_text(json.dumps({node: int(us) for node, us in latest.items()})) + "::jsonb"


def receipt_us(received_at: float) -> int:
    """A receipt time (seconds since the epoch) in microseconds, rounded as the index stores it
    (:func:`fastscp.index.batchtable.timestamps`), so a touch compares equal to its row."""
    return round(received_at * 1_000_000.0)


class StudyJobs:
    """This node's view of the study jobs.

    Parameters
    ----------
    con : duckdb.DuckDBPyConnection
        A connection with DuckDB's postgres extension loaded (a shared
        :class:`~fastscp.index.database.Index`'s); the catalog database is
        attached to it as :data:`ALIAS`.
    catalog : str
        The libpq connection string (``database.catalog`` without ``postgres:``).
    node : str
        This node's name (``server.node``).

    Raises
    ------
    duckdb.Error
        The catalog can't be reached or the tables can't be made.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, catalog: str, node: str) -> None:
        self.con = con
        self.node = node
        try:
            # READ COMMITTED: a row lock waits for, then sees, another node's committed change (REPEATABLE
            # READ, the extension's default, would fail with a serialization error instead).
            con.execute(f"ATTACH {pg_text(catalog)} AS {ALIAS} (TYPE postgres, ISOLATION_LEVEL 'READ COMMITTED')")
        except duckdb.Error as exc:
            # Never the connection string (it may hold a password).
            raise duckdb.Error(str(exc).splitlines()[0].replace(catalog, "<database.catalog>")) from None
        for attempt in range(1, SCHEMA_ATTEMPTS + 1):
            try:
                for statement in _SCHEMA:
                    self._execute(statement)
                break
            except duckdb.Error as exc:
                if attempt == SCHEMA_ATTEMPTS:
                    raise
                log.info("study jobs: making the tables, attempt %d: %s", attempt, str(exc).splitlines()[0])
                time.sleep(0.2 * attempt)

    def _execute(self, sql: str) -> None:
        # One statement, one catalog transaction (DuckDB's autocommit).
        self.con.execute(f"CALL postgres_execute({pg_text(ALIAS)}, {pg_text(sql)})")

    def _query(self, sql: str) -> list[tuple[object, ...]]:
        return self.con.execute(f"SELECT * FROM postgres_query({pg_text(ALIAS)}, {pg_text(sql)})").fetchall()

    def _update(self, sql: str, columns: str, where: str) -> list[tuple[object, ...]]:
        """Run an UPDATE of the jobs; ``columns`` of the rows it changed (among those ``where`` selects).

        postgres_query takes only a SELECT (it wraps the text in one), so no
        RETURNING: the UPDATE and a SELECT of the rows this transaction
        wrote (``xmin``, PostgreSQL 13 or later) share one catalog transaction.
        """
        self.con.execute("BEGIN TRANSACTION")
        try:
            self._execute(sql)
            rows = self._query(f"SELECT {columns} FROM {JOBS} WHERE {where} AND xmin = pg_current_xact_id()::xid")
            self.con.execute("COMMIT")
        except BaseException:
            try:
                self.con.execute("ROLLBACK")
            except duckdb.Error:
                pass  # the transaction is gone already
            raise
        return rows

    def touch(self, studies: dict[str, int], quiet_seconds: float) -> None:
        """Instances of ``studies`` (study -> the latest one's :func:`receipt_us`) were stored here: each is due
        ``quiet_seconds`` from now at the earliest, unless the last finished job read them already."""
        # Sorted: every node locks rows in one order, so two touches never deadlock.
        uids = sorted(studies)
        node = pg_text(self.node)
        for start in range(0, len(uids), TOUCH_BATCH):
            batch = uids[start:start + TOUCH_BATCH]
            values = ", ".join(pg_text(uid) for uid in batch)
            receipts = ", ".join(str(int(studies[uid])) for uid in batch)
            self._execute(
                f"INSERT INTO {JOBS} AS j (study_instance_uid, quiet_at, touched) "
                f"SELECT uid, now() + {_seconds(quiet_seconds)}, jsonb_build_object({node}, us) "
                f"FROM unnest(ARRAY[{values}]::text[], ARRAY[{receipts}]::bigint[]) AS t(uid, us) "
                "ON CONFLICT (study_instance_uid) DO UPDATE SET quiet_at = greatest(j.quiet_at, EXCLUDED.quiet_at), "
                f"version = j.version + 1, touched = j.touched || jsonb_build_object({node}, greatest("
                f"(EXCLUDED.touched ->> {node})::bigint, coalesce((j.touched ->> {node})::bigint, -1))) "
                f"WHERE (EXCLUDED.touched ->> {node})::bigint > coalesce((j.covered ->> {node})::bigint, -1)")

    def take(self, lease: float) -> tuple[str, int, str] | None:
        """The job of one quiet study, now this node's for ``lease`` seconds: (study, version, previous holder).

        The previous holder is "" unless its lease ran out (a node that died
        or stalled). None: no study is due, or every due one is held.
        """
        node = pg_text(self.node)
        rows = self._update(
            f"UPDATE {JOBS} j SET holder = {node}, lease_until = now() + {_seconds(lease)}, "
            "held_version = j.version, taken_from = due.holder "
            f"FROM (SELECT study_instance_uid, holder FROM {JOBS} WHERE version > done_version AND quiet_at <= now() "
            "AND (holder IS NULL OR lease_until < now()) ORDER BY quiet_at LIMIT 1 FOR UPDATE SKIP LOCKED) due "
            "WHERE j.study_instance_uid = due.study_instance_uid",
            "study_instance_uid, held_version, coalesce(taken_from, '')", f"holder = {node}")
        if not rows:
            return None
        study, version, previous = rows[0]
        return str(study), int(version), str(previous)  # type: ignore[call-overload]

    def renew(self, study: str, lease: float) -> bool:
        """Extend this node's lease on a study's job; False if it is no longer ours (it ran out: taken over)."""
        mine = f"study_instance_uid = {pg_text(study)} AND holder = {pg_text(self.node)}"
        return bool(self._update(f"UPDATE {JOBS} SET lease_until = now() + {_seconds(lease)} WHERE {mine}", "1",
                                 mine))

    def finish(self, study: str, version: int, read: dict[str, int]) -> bool:
        """The job, taken at ``version``, read the study's rows up to ``read`` (node -> the latest receipt,
        :func:`receipt_us`); False if it was no longer ours.

        Done as of the row's version now, unless a node touched instances
        since that the job did not read: then it is due again.
        """
        this = f"study_instance_uid = {pg_text(study)}"
        covered = f"(j.covered || {_receipts(read)})"
        unread = (f"EXISTS (SELECT 1 FROM jsonb_each_text(j.touched) t "
                  f"WHERE t.value::bigint > coalesce(({covered} ->> t.key)::bigint, -1))")
        return bool(self._update(
            f"UPDATE {JOBS} j SET covered = {covered}, holder = NULL, lease_until = NULL, done_at = now(), "
            f"done_by = {pg_text(self.node)}, done_version = CASE WHEN {unread} "
            f"THEN greatest(j.done_version, {int(version)}) ELSE j.version END "
            f"WHERE {this} AND holder = {pg_text(self.node)}", "1", this))

    def release(self, study: str) -> None:
        """Give a job back undone (this node stops): another node takes it at once."""
        self._execute(f"UPDATE {JOBS} SET holder = NULL, lease_until = NULL "
                      f"WHERE study_instance_uid = {pg_text(study)} AND holder = {pg_text(self.node)}")

    def release_all(self) -> int:
        """Give back every job held in this node's name (its post-store process starts: none of them runs)."""
        # Once per start: the scan of the table for the rows written is affordable.
        return len(self._update(f"UPDATE {JOBS} SET holder = NULL, lease_until = NULL "
                                f"WHERE holder = {pg_text(self.node)}", "1", "true"))

    def prune(self) -> None:
        """Forget jobs finished more than :data:`KEEP_DONE` ago and not touched since."""
        self._execute(f"DELETE FROM {JOBS} WHERE version = done_version AND done_at < now() - interval "
                      f"{pg_text(KEEP_DONE)}")

    def close(self) -> None:
        try:
            self.con.execute(f"DETACH {ALIAS}")
        except duckdb.Error as exc:
            log.info("study jobs: detaching the catalog: %s", str(exc).splitlines()[0])
