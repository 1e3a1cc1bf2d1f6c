"""Runs compiled segment SQL on SQLite or DuckDB over data exported by cible.

Usage: sql_members.py sqlite|duckdb EVENTS PROFILES QUERIES.json
EVENTS and PROFILES are the JSON Lines of `cible export events|profiles`, or CSV files already in
the table layout (events, optionally .csv.gz: profile, ts, event, properties; profiles: profile,
traits, computed, consents).
QUERIES.json is {"name": "SELECT ..."}; prints {"seconds": query time, "members": {"name":
[profile, ...]}} as JSON. Builds the table layout documented in docs/segment-language.md ("SQL");
only the queries are timed.
"""
import csv
import gzip
import json
import sys
import time
from datetime import datetime

engine, events_path, profiles_path, queries_path = sys.argv[1:5]


def seconds(text):
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(stamp.timestamp() * 1000) // 1000


def event_rows():
    if events_path.endswith((".csv", ".csv.gz")):
        # Already in the layout: profile, ts (seconds), event (empty for none), properties JSON.
        opener = gzip.open if events_path.endswith(".gz") else open
        with opener(events_path, "rt", newline="") as f:
            for profile, ts, event, properties in csv.reader(f):
                yield (int(profile), int(ts), event or None, properties)
        return
    with open(events_path) as f:
        for line in f:
            e = json.loads(line)
            event = e.get("event") if e["type"] in ("track", "page", "screen") else None
            yield (e["profile"], seconds(e["timestamp"]), event, json.dumps(e.get("properties", {})))


with open(profiles_path, newline="") as f:
    if profiles_path.endswith(".csv"):
        # (profile, traits, computed[, consents]): consents default to none granted.
        profiles = [(int(row[0]), row[1], row[2], row[3] if len(row) > 3 else "{}") for row in csv.reader(f)]
    else:
        profiles = [
            (p["profile"], json.dumps(p["traits"]), json.dumps(p.get("computed", {})), json.dumps(p.get("consents", {})))
            for p in map(json.loads, f)
        ]

if engine == "sqlite":
    import sqlite3

    db = sqlite3.connect(":memory:")
    db.executescript(
        "CREATE TABLE events (profile INTEGER, ts INTEGER, event TEXT, properties TEXT);"
        "CREATE TABLE profiles (profile INTEGER PRIMARY KEY, traits TEXT, computed TEXT, consents TEXT);"
        "CREATE TABLE segment_members (segment TEXT, profile INTEGER);"
    )
    db.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", event_rows())
    db.executemany("INSERT INTO profiles VALUES (?, ?, ?, ?)", profiles)
    db.execute("CREATE INDEX events_by_profile ON events (profile, event, ts)")
    run = lambda sql: [row[0] for row in db.execute(sql)]
else:
    import os
    import tempfile

    import duckdb

    # Rows go through CSV files, which DuckDB loads in bulk (given as is when already CSV).
    folder = tempfile.mkdtemp()
    events_csv, profiles_csv = os.path.join(folder, "events.csv"), os.path.join(folder, "profiles.csv")
    if events_path.endswith((".csv", ".csv.gz")):
        events_csv = events_path
    else:
        with open(events_csv, "w", newline="") as f:
            csv.writer(f).writerows(event_rows())
    with open(profiles_csv, "w", newline="") as f:
        csv.writer(f).writerows(profiles)
    db = duckdb.connect()
    db.execute(f"SET temp_directory = '{folder}'")  # spill beside the CSV, not in the cwd
    db.execute(
        f"CREATE TABLE events AS SELECT * FROM read_csv('{events_csv}', header=false, "
        "columns={'profile': 'INTEGER', 'ts': 'BIGINT', 'event': 'VARCHAR', 'properties': 'VARCHAR'})"
    )
    db.execute(
        f"CREATE TABLE profiles AS SELECT * FROM read_csv('{profiles_csv}', header=false, "
        "columns={'profile': 'INTEGER', 'traits': 'VARCHAR', 'computed': 'VARCHAR', 'consents': 'VARCHAR'})"
    )
    db.execute("CREATE TABLE segment_members (segment VARCHAR, profile INTEGER)")
    run = lambda sql: [row[0] for row in db.execute(sql).fetchall()]

with open(queries_path) as f:
    queries = json.load(f)
started = time.perf_counter()
members = {name: sorted(run(sql)) for name, sql in queries.items()}
print(json.dumps({"seconds": time.perf_counter() - started, "members": members}))
