"""Cohort retention in DuckDB SQL over events exported by cible, the reference that
`cible cohort retention` is checked against cell by cell (and timed against in cible-bench).

Usage: cohort_retention.py EVENTS PERIOD NOW [--active A,B] [--profiles FILE]
EVENTS is the JSON Lines of `cible export events`, or a CSV file already in the table layout
(events, optionally .csv.gz: profile, ts, event, properties; see sql_members.py). PERIOD is day,
week or month; NOW is epoch seconds: events after it are left out, and every cohort has a cell
per period up to the one holding NOW. --active lists the event names that count (default: every
named event: track, page, screen). --profiles is a JSON list of the profile numbers to keep.
A cohort is the period (UTC day, ISO week from Monday, calendar month) of a profile's first
active event; cell k counts its profiles active in period cohort + k.
Prints {"seconds": query time, "cohorts": [{"start", "size", "counts"}]}; only the query is
timed, as in sql_members.py.
"""
import argparse
import csv
import gzip
import json
import os
import tempfile
import time
from datetime import datetime

import duckdb

parser = argparse.ArgumentParser()
parser.add_argument("events")
parser.add_argument("period", choices=["day", "week", "month"])
parser.add_argument("now", type=int)
parser.add_argument("--active")
parser.add_argument("--profiles")
args = parser.parse_args()


def seconds(text):
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(stamp.timestamp() * 1000) // 1000


folder = tempfile.mkdtemp()
events_csv = args.events
if not args.events.endswith((".csv", ".csv.gz")):
    events_csv = os.path.join(folder, "events.csv")
    with open(args.events) as source, open(events_csv, "w", newline="") as out:
        writer = csv.writer(out)
        for line in source:
            e = json.loads(line)
            event = e.get("event") if e["type"] in ("track", "page", "screen") else None
            writer.writerow((e["profile"], seconds(e["timestamp"]), event, "{}"))

db = duckdb.connect()
db.execute(f"SET temp_directory = '{folder}'")
db.execute(
    f"CREATE TABLE events AS SELECT profile, ts, event FROM read_csv('{events_csv}', header=false, "
    "columns={'profile': 'INTEGER', 'ts': 'BIGINT', 'event': 'VARCHAR', 'properties': 'VARCHAR'})"
)
conditions = ["event IS NOT NULL", f"ts <= {args.now}"]
if args.active is not None:
    names = [name.strip() for name in args.active.split(",") if name.strip()]
    conditions.append("event IN (" + ", ".join("'" + n.replace("'", "''") + "'" for n in names) + ")")
if args.profiles is not None:
    db.execute("CREATE TABLE kept (profile INTEGER)")
    db.executemany("INSERT INTO kept VALUES (?)", [(p,) for p in json.load(open(args.profiles))])
    conditions.append("profile IN (SELECT profile FROM kept)")


def period_of(column):
    return f"CAST(date_trunc('{args.period}', make_timestamp(CAST({column} AS BIGINT) * 1000000)) AS DATE)"


def periods_between(first, last):
    if args.period == "day":
        return f"({last} - {first})"
    if args.period == "week":
        return f"(({last} - {first}) // 7)"
    return f"((year({last}) - year({first})) * 12 + month({last}) - month({first}))"


sql = f"""
WITH active AS (
    SELECT DISTINCT profile, {period_of('ts')} AS p FROM events WHERE {' AND '.join(conditions)}
),
cohorts AS (SELECT profile, MIN(p) AS cohort FROM active GROUP BY profile),
cells AS (
    SELECT c.cohort, {periods_between('c.cohort', 'a.p')} AS k, COUNT(*) AS n
    FROM active a JOIN cohorts c USING (profile) GROUP BY c.cohort, k
),
now_period AS (SELECT {period_of(str(args.now))} AS current)
SELECT strftime(cells.cohort, '%Y-%m-%d'), {periods_between('cells.cohort', 'now_period.current')} + 1 AS width, k, n
FROM cells, now_period ORDER BY 1, 3
"""
started = time.perf_counter()
rows = db.execute(sql).fetchall()
elapsed = time.perf_counter() - started
cohorts = {}
for start, width, k, n in rows:
    cohort = cohorts.setdefault(start, {"start": start, "counts": [0] * width})
    cohort["counts"][k] = n
for cohort in cohorts.values():
    cohort["size"] = cohort["counts"][0]
print(json.dumps({"seconds": elapsed, "cohorts": list(cohorts.values())}))
