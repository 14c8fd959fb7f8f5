"""Queries on the index as SQL: DICOM matching (PS3.4 C.2.2.2), the query builder, and execution.

A :class:`~fastscp.query.messages.QueryRequest` runs

* in the server, where the indexer answers it over its query socket
  (:mod:`fastscp.query.server`) from its own DuckDB cursor, so stores never
  wait for a query; or
* on a stopped server's index file, opened read-only
  (:class:`fastscp.query.client.LocalQueryClient`).

Values never become SQL text: :func:`build_query` emits ``?`` parameters,
and keywords are looked up in :mod:`fastscp.query.attributes` (the columns,
or the attribute map, whose JSON path is made from the tag number), so a
request can name only those. Counts (Number of Study Related Instances...)
are aggregated from ``instances`` for the rows a query returns only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import duckdb

from fastscp.index.database import latest_study_first, patient_key
from fastscp.query.attributes import ATTRIBUTES, DEFAULT_KEYS, Attribute, attribute_for, map_joins, map_sql
from fastscp.query.messages import (
    CHUNK_ROWS,
    LEVELS,
    Columns,
    Count,
    Done,
    Failed,
    Message,
    QueryError,
    QueryRequest,
    QueryResult,
    Rows,
    SqlRequest,
    Stats,
    StatsRequest,
)
from fastscp.status import IndexerState

# Each level's rows with the attributes of every level above it. Each study
# carries its own patient attributes: a STUDY (and lower) query matches and
# returns those. PATIENT rows are studies too, one per patient_key (see
# build_query).
_FROM: dict[str, str] = {
    "PATIENT": "studies st",
    "STUDY": "studies st",
    "SERIES": "series se JOIN studies st ON st.study_instance_uid = se.study_instance_uid",
    "IMAGE": "instances i JOIN series se ON se.series_instance_uid = i.series_instance_uid "
             "JOIN studies st ON st.study_instance_uid = i.study_instance_uid",
}


def _from(level: str, thumbnails: bool, tags: set[int] | None = None) -> str:
    """The rows of ``level``; at IMAGE level with the thumbnails and the base map values of ``tags``."""
    if level != "IMAGE":
        return _FROM[level]
    return (_FROM[level] + (" LEFT JOIN thumbnails t ON t.path = i.path" if thumbnails else "")
            + map_joins(tags or set()))


# What identifies a row of each level.
_KEY: dict[str, str] = {"PATIENT": patient_key("st"), "STUDY": "st.study_instance_uid",
                        "SERIES": "se.series_instance_uid", "IMAGE": "i.path"}
_ORDER: dict[str, tuple[str, ...]] = {
    "PATIENT": ("st.patient_name", "st.patient_id", "st.study_instance_uid"),
    "STUDY": ("st.study_date DESC", "st.study_time DESC", "st.study_instance_uid"),
    "SERIES": ("st.study_date DESC", "st.study_instance_uid", "se.series_number", "se.series_instance_uid"),
    "IMAGE": ("i.study_instance_uid", "i.series_instance_uid", "i.instance_number", "i.path"),
}
# The derived keys of each level, from an aggregate of the instances (and
# series) of the rows matched, keyed by "k".
_AGGREGATES: dict[str, tuple[str, ...]] = {
    "PATIENT": (
        f"""SELECT {patient_key("st")} AS k, count(DISTINCT i.study_instance_uid) AS number_of_patient_related_studies,
                  count(DISTINCT i.series_instance_uid) AS number_of_patient_related_series,
                  count(*) AS number_of_patient_related_instances, sum(i.size) AS bytes
           FROM instances i JOIN studies st ON st.study_instance_uid = i.study_instance_uid
           WHERE {patient_key("st")} IN (SELECT k FROM matched) GROUP BY 1""",
    ),
    "STUDY": (
        """SELECT i.study_instance_uid AS k, count(DISTINCT i.series_instance_uid) AS number_of_study_related_series,
                  count(*) AS number_of_study_related_instances, sum(i.size) AS bytes,
                  string_agg(DISTINCT i.sop_class_uid, '\\' ORDER BY i.sop_class_uid) AS sop_classes_in_study
           FROM instances i WHERE i.study_instance_uid IN (SELECT k FROM matched) GROUP BY i.study_instance_uid""",
        """SELECT se.study_instance_uid AS k,
                  string_agg(DISTINCT se.modality, '\\' ORDER BY se.modality) AS modalities_in_study
           FROM series se WHERE se.study_instance_uid IN (SELECT k FROM matched) GROUP BY se.study_instance_uid""",
    ),
    "SERIES": (
        """SELECT i.series_instance_uid AS k, count(*) AS number_of_series_related_instances, sum(i.size) AS bytes
           FROM instances i WHERE i.series_instance_uid IN (SELECT k FROM matched)
           GROUP BY i.series_instance_uid""",
    ),
    "IMAGE": (),
}
# Which aggregate of a level holds a derived key.
_AGGREGATE_OF: dict[str, int] = {"modalities_in_study": 1}

#: VRs on which ``*`` and ``?`` are wildcards (PS3.4 C.2.2.2.4).
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_RANGE_VRS = frozenset({"DA", "TM", "DT"})
_NUMERIC_VRS = {"IS": int, "US": int, "SS": int, "UL": int, "SL": int, "UV": int, "DS": float, "FL": float,
                "FD": float}


def _like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def match_sql(expr: str, vr: str, value: str, params: list[object]) -> str | None:
    """The SQL condition for DICOM matching of ``expr`` against ``value``; None if it matches all.

    Parameters
    ----------
    expr : str
        A column expression (from :data:`ATTRIBUTES`, never from a request).
    vr : str
        The attribute's value representation.
    value : str
        The matching value of the request.
    params : list
        The ``?`` parameters of the query; this call appends its own.

    Notes
    -----
    PS3.4 C.2.2.2: empty (and, on text, ``*``) is universal matching; a
    backslash-separated list matches any of its values (list of UID
    matching, C.2.2.2.2, applied to every VR); ``*``/``?`` are wildcards on
    the text VRs (PN case-insensitively, as C.2.2.2.4 allows); ``A-B``,
    ``A-`` and ``-B`` are inclusive ranges on DA/TM/DT, where a bound matches
    every value it is a prefix of (``1300`` up to ``13:00:59.999999``).
    """
    value = value.strip()
    if value == "" or (vr in WILDCARD_VRS and value.strip("*") == "" and "*" in value):
        return None
    parts = []
    for single in value.split("\\"):
        part = _match_one(expr, vr, single.strip(), params)
        if part is None:
            return None  # one universal alternative: everything matches
        parts.append(part)
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


def _match_one(expr: str, vr: str, value: str, params: list[object]) -> str | None:
    if value == "":
        return None
    if vr in _RANGE_VRS and "-" in value and not (vr == "DT" and value.count("-") != 1):
        low, _, high = value.partition("-")
        terms = []
        if low:
            params.append(low)
            terms.append(f"{expr} >= ?")
        if high:
            # "~" sorts after every digit and ".": the bound includes every value it prefixes.
            params.append(high + "~")
            terms.append(f"{expr} <= ?")
        if not terms:
            return None
        return "(" + " AND ".join(terms) + f" AND {expr} <> '')"
    if vr in _NUMERIC_VRS:
        try:
            params.append(_NUMERIC_VRS[vr](value))
        except ValueError:
            return "FALSE"  # not a number: nothing can equal it
        return f"{expr} = ?"
    if vr in WILDCARD_VRS and ("*" in value or "?" in value):
        params.append(_like_pattern(value))
        return f"{expr} {'ILIKE' if vr == 'PN' else 'LIKE'} ? ESCAPE '\\'"
    params.append(value)
    if vr == "PN":
        return f"lower({expr}) = lower(?)"
    return f"{expr} = ?"


def _match_attribute(attribute: Attribute, value: str, params: list[object]) -> str | None:
    """:func:`match_sql` for an attribute; a multi-valued one matches if any of its values does."""
    if not attribute.values:
        return match_sql(attribute.sql, attribute.vr, value, params)
    if attribute.values == attribute.sql:
        # The map holds numbers as text: compare them as numbers.
        value_sql = "TRY_CAST(mv.x AS DOUBLE)" if attribute.tag and attribute.vr in _NUMERIC_VRS else "mv.x"
        one = match_sql(value_sql, attribute.vr, value, params)
        if one is None:
            return None
        return f"EXISTS (SELECT 1 FROM unnest(string_split({attribute.values}, '\\')) AS mv(x) WHERE {one})"
    first = match_sql(attribute.sql, attribute.vr, value, params)
    if first is None:
        return None
    others = match_sql("TRY_CAST(mv.x AS DOUBLE)", attribute.vr, value, params)
    return (f"({first} OR EXISTS (SELECT 1 FROM unnest(string_split({attribute.values}, '\\')) AS mv(x) "
            f"WHERE {others}))")


def _either_uid(sql: str, value: str, params: list[object]) -> str:
    """An instance matches by either UID: the data set's (``sql``) or the command's where it differed."""
    return f"({sql} OR {match_sql('i.affected_sop_instance_uid', 'UI', value, params)})"


def _returned(attribute: Attribute) -> str:
    """SQL of what a key returns: every value of a multi-valued number, as text."""
    if attribute.values and attribute.values != attribute.sql:
        return f"if(coalesce({attribute.values}, '') <> '', {attribute.values}, CAST({attribute.sql} AS VARCHAR))"
    return attribute.sql


def _attribute(keyword: str, level: str) -> Attribute:
    attribute = attribute_for(keyword)
    assert attribute is not None  # checked by build_query
    if keyword == "Bytes" and level == "IMAGE":
        return Attribute("IMAGE", "i.size", "UV", dicom=False)  # one file: no aggregate needed
    return attribute


def _study_modality_match(level: str, value: str, params: list[object]) -> str | None:
    """Modalities In Study: the study has a series of one of the modalities."""
    condition = match_sql("se2.modality", "CS", value, params)
    if condition is None:
        return None
    if level == "PATIENT":
        return (f"{_KEY[level]} IN (SELECT {patient_key('st2')} FROM series se2 JOIN studies st2 "
                f"ON st2.study_instance_uid = se2.study_instance_uid WHERE {condition})")
    return f"st.study_instance_uid IN (SELECT se2.study_instance_uid FROM series se2 WHERE {condition})"


def _newest_values(level: str, tags: list[int]) -> str:
    """SQL of CTE ``m``: per row of ``matched`` (key k), each tag's value in its newest instance that has one."""
    values = ", ".join(f"arg_max({map_sql(tag)}, i.received_at) AS m{n}" for n, tag in enumerate(tags))
    if level == "PATIENT":
        return (f"m AS (SELECT {patient_key('st')} AS k, {values} FROM instances i JOIN studies st "
                f"ON st.study_instance_uid = i.study_instance_uid{map_joins(set(tags))} "
                f"WHERE {patient_key('st')} IN (SELECT k FROM matched) GROUP BY 1)")
    key = "i.study_instance_uid" if level == "STUDY" else "i.series_instance_uid"
    return (f"m AS (SELECT {key} AS k, {values} FROM instances i{map_joins(set(tags))} "
            f"WHERE {key} IN (SELECT k FROM matched) GROUP BY 1)")


class BuiltQuery(NamedTuple):
    sql: str
    params: list[object]
    columns: list[str]


def build_query(request: QueryRequest) -> BuiltQuery:
    """Turn a request into one parameterised SQL statement.

    Conditions on the query level and the levels above it filter the joined
    rows; conditions on levels below it keep the rows that have a matching
    descendant (all such conditions on one descendant).

    A PATIENT row is a patient's latest study (:func:`fastscp.index.database.latest_study_first`)
    among those that match the patient conditions: every name a Patient ID
    was stored under matches, and the answer shows the name that matched.

    Raises
    ------
    QueryError
        An unknown level or keyword, or a derived key used as a condition.
    """
    level = request.level
    if level not in LEVELS:
        raise QueryError(f"unknown level {level!r}; use one of {', '.join(LEVELS)}")
    depth = LEVELS.index(level)
    keys = list(request.keys) or list(DEFAULT_KEYS[level])
    for keyword in keys:
        attribute = attribute_for(keyword)
        if attribute is None:
            raise QueryError(f"unknown key {keyword!r}: not a DICOM keyword of an attribute fastscp indexes "
                             f"(sequences and binary values are not), nor one of {', '.join(sorted(ATTRIBUTES))}")
        if not attribute.tag and LEVELS.index(attribute.level) > depth:
            raise QueryError(f"{keyword} is a key of the {attribute.level} level: "
                             f"a {level} query can't return it")
    thumbnails = "ThumbnailPath" in keys or any(c.keyword == "ThumbnailPath" for c in request.conditions)
    named = [*keys, *(c.keyword for c in request.conditions)]
    tags = {tag for keyword in named if (tag := getattr(attribute_for(keyword), "tag", 0))}  # read from the map
    # SQL pieces and their parameters, in the order they appear in the statement.
    where: list[str] = []
    where_params: list[object] = []
    below: list[str] = []
    below_params: list[object] = []
    lowest = depth
    for condition in request.conditions:
        attribute = attribute_for(condition.keyword)
        if attribute is None:
            raise QueryError(f"unknown key {condition.keyword!r} in a condition")
        if condition.keyword == "ModalitiesInStudy":
            sql = _study_modality_match(level, condition.value, where_params)
            if sql is not None:
                where.append(sql)
            continue
        if attribute.derived:
            raise QueryError(f"{condition.keyword} is computed by fastscp; it can be returned, not matched")
        attribute_depth = LEVELS.index(attribute.level)
        if attribute_depth > depth:
            sql = _match_attribute(attribute, condition.value, below_params)
            if sql is not None and condition.keyword == "SOPInstanceUID":
                sql = _either_uid(sql, condition.value, below_params)
            if sql is not None:
                below.append(sql)
                lowest = max(lowest, attribute_depth)
        else:
            sql = _match_attribute(attribute, condition.value, where_params)
            if sql is not None and condition.keyword == "SOPInstanceUID":
                sql = _either_uid(sql, condition.value, where_params)
            if sql is not None:
                where.append(sql)
    params = where_params + below_params
    if below:
        # Rows of this level with a descendant that matches every lower condition.
        where.append(f"{_KEY[level]} IN (SELECT {_KEY[level]} FROM {_from(LEVELS[lowest], thumbnails, tags)} "
                     f"WHERE {' AND '.join(below)})")
    where_sql = f" WHERE {' AND '.join(where)}" if where else ""
    source = _from(level, thumbnails, tags)
    if level == "PATIENT":
        source = (f"(SELECT DISTINCT ON ({_KEY[level]}) * FROM {source}{where_sql} "
                  f"ORDER BY {_KEY[level]}, {latest_study_first('st')}) st")
        where_sql = ""
    order = _ORDER[level] if request.ordered else ()
    limit = ""
    if request.limit > 0:
        limit = " LIMIT ?"
        params.append(int(request.limit))
    attributes = {keyword: _attribute(keyword, level) for keyword in keys}
    # Attributes of the map, above IMAGE level: the newest instance's value
    # (that has one), computed like the derived keys for the rows returned.
    mapped = [keyword for keyword in keys if attributes[keyword].tag and level != "IMAGE"]
    derived = [keyword for keyword in keys if attributes[keyword].derived or keyword in mapped]
    if not derived:
        select = ", ".join(f"{_returned(attributes[k])} AS c{n}" for n, k in enumerate(keys))
        order_sql = f" ORDER BY {', '.join(order)}" if order else ""
        return BuiltQuery(f"SELECT {select} FROM {source}{where_sql}{order_sql}{limit}", params,
                          keys)
    # Rows first (with their order and limit), then their counts.
    plain = [(n, k) for n, k in enumerate(keys) if k not in derived]
    inner = [f"{_KEY[level]} AS k"] + [f"{_returned(attributes[k])} AS c{n}" for n, k in plain]
    inner += [f"{term.removesuffix(' DESC')} AS o{n}" for n, term in enumerate(order)]
    inner_order = f" ORDER BY {', '.join(order)}" if order else ""
    aggregates = _AGGREGATES[level]
    used = sorted({_AGGREGATE_OF.get(attributes[k].sql, 0) for k in derived if k not in mapped})
    ctes = [f"matched AS (SELECT {', '.join(inner)} FROM {source}{where_sql}{inner_order}{limit})"]
    ctes += [f"a{n} AS ({aggregates[n]})" for n in used]
    joins = "".join(f" LEFT JOIN a{n} ON a{n}.k = matched.k" for n in used)
    if mapped:
        ctes.append(_newest_values(level, [attributes[k].tag for k in mapped]))
        joins += " LEFT JOIN m ON m.k = matched.k"
    outer = []
    for n, keyword in enumerate(keys):
        attribute = attributes[keyword]
        if keyword in mapped:
            outer.append(f"m.m{mapped.index(keyword)} AS c{n}")
        elif attribute.derived:
            source = f"a{_AGGREGATE_OF.get(attribute.sql, 0)}.{attribute.sql}"
            if attribute.vr in _NUMERIC_VRS:
                source = f"coalesce({source}, 0)"
            outer.append(f"{source} AS c{n}")
        else:
            outer.append(f"matched.c{n}")
    outer_order = ""
    if order:
        outer_order = " ORDER BY " + ", ".join(
            f"matched.o{n}{' DESC' if term.endswith(' DESC') else ''}" for n, term in enumerate(order))
    sql = f"WITH {', '.join(ctes)} SELECT {', '.join(outer)} FROM matched{joins}{outer_order}"
    return BuiltQuery(sql, params, keys)


# -- execution -----------------------------------------------------------------------------


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse anything but one SELECT statement (``fastscp sql`` runs in the server, on its writable index).

    Raises
    ------
    QueryError
        Not SQL, several statements, or a statement of another kind.
    """
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0]) from None
    kinds = [statement.type.name for statement in statements]
    if kinds != ["SELECT"]:
        raise QueryError(f"one SELECT statement is run (the index is read-only here), "
                         f"not {' + '.join(kinds) or 'none'}")


def run_query(con: duckdb.DuckDBPyConnection, request: QueryRequest | SqlRequest) -> QueryResult:
    """Run a request on a DuckDB connection (one per thread); rows are fetched in chunks."""
    if isinstance(request, SqlRequest):
        check_read_only(con, request.sql)
        cursor = con.execute(request.sql)
        columns = [column[0] for column in cursor.description or ()]
    else:
        built = build_query(request)
        cursor = con.execute(built.sql, built.params)
        columns = built.columns

    def rows() -> Iterator[list[Any]]:
        while chunk := cursor.fetchmany(CHUNK_ROWS):
            for row in chunk:
                yield list(row)

    return QueryResult(columns, rows())


def stream_query(con: duckdb.DuckDBPyConnection, request: QueryRequest | SqlRequest) -> Iterator[Message]:
    """The messages that answer a request: Columns, Rows..., Done; or Failed."""
    try:
        result = run_query(con, request)
    except (QueryError, duckdb.Error) as exc:
        yield Failed(str(exc))
        return
    yield Columns(result.columns)
    count = 0
    chunk: list[list[Any]] = []
    for row in result:
        chunk.append(row)
        if len(chunk) >= CHUNK_ROWS:
            count += len(chunk)
            yield Rows(chunk)
            chunk = []
    if chunk:
        count += len(chunk)
        yield Rows(chunk)
    yield Done(count)


def _counts(con: duckdb.DuckDBPyConnection, sql: str, params: list[object] | None = None) -> list[Count]:
    return [Count(name=str(name), instances=int(n), bytes=int(b or 0), studies=int(s))
            for name, n, b, s in con.execute(sql, params or []).fetchall()]


def run_stats(con: duckdb.DuckDBPyConnection, request: StatsRequest, indexer: IndexerState | None = None) -> Stats:
    """Totals, and instances/bytes/studies by modality, calling AE title and day received."""
    # fetchall, not fetchone: DuckDB 2 keeps a half-read result open on the connection.
    instances, total_bytes = con.execute("SELECT count(*), coalesce(sum(size), 0) FROM instances").fetchall()[0]

    def count(table: str) -> int:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])

    return Stats(
        instances=int(instances),
        series=count("series"),
        studies=count("studies"),
        patients=count("patients"),
        bytes=int(total_bytes),
        duplicate_conflicts=count("duplicate_conflicts"),
        by_modality=_counts(con, (
            "SELECT modality, count(*), sum(size), count(DISTINCT study_instance_uid) FROM instances "
            "GROUP BY 1 ORDER BY 2 DESC, 1")),
        by_calling_ae_title=_counts(con, (
            "SELECT calling_ae_title, count(*), sum(size), count(DISTINCT study_instance_uid) FROM instances "
            "GROUP BY 1 ORDER BY 2 DESC, 1")),
        by_day=_counts(con, (
            "SELECT strftime(CAST(received_at + to_seconds(CAST(? AS BIGINT)) AS DATE), '%Y-%m-%d'), count(*), "
            "sum(size), count(DISTINCT study_instance_uid) FROM instances GROUP BY 1 ORDER BY 1"),
            [int(request.utc_offset)]),
        indexer=indexer,
    )
