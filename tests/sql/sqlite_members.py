"""Runs compiled segment SQL on SQLite over data exported by cible.

Usage: sqlite_members.py EVENTS.jsonl PROFILES.jsonl QUERIES.json
QUERIES.json is {"name": "SELECT ..."}; prints {"name": [profile, ...]} as JSON.
Builds the table layout documented in docs/segment-language.md ("SQL").
"""
import json
import sqlite3
import sys
from datetime import datetime

events_path, profiles_path, queries_path = sys.argv[1:4]
db = sqlite3.connect(":memory:")
db.executescript(
    """
    CREATE TABLE events (profile INTEGER, ts INTEGER, event TEXT, properties TEXT);
    CREATE TABLE profiles (profile INTEGER PRIMARY KEY, traits TEXT);
    CREATE TABLE segment_members (segment TEXT, profile INTEGER);
    """
)


def seconds(text):
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(stamp.timestamp() * 1000) // 1000


with open(events_path) as f:
    rows = []
    for line in f:
        e = json.loads(line)
        event = e.get("event") if e["type"] in ("track", "page", "screen") else None
        rows.append((e["profile"], seconds(e["timestamp"]), event, json.dumps(e.get("properties", {}))))
    db.executemany("INSERT INTO events VALUES (?, ?, ?, ?)", rows)
with open(profiles_path) as f:
    db.executemany(
        "INSERT INTO profiles VALUES (?, ?)",
        [(p["profile"], json.dumps(p["traits"])) for p in map(json.loads, f)],
    )
db.execute("CREATE INDEX events_by_profile ON events (profile, event, ts)")
with open(queries_path) as f:
    queries = json.load(f)
result = {name: sorted(row[0] for row in db.execute(sql)) for name, sql in queries.items()}
print(json.dumps(result))
