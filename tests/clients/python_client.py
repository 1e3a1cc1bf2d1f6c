"""Sends every kind of Segment call to cible through the official Python library.

Usage: python_client.py HOST WRITE_KEY PREFIX
Prints the JSON list of the messageIds it sent.
"""
import json
import sys

import segment.analytics as analytics

host, write_key, prefix = sys.argv[1:4]
errors = []
analytics.write_key = write_key
analytics.host = host
analytics.gzip = True
analytics.upload_size = 5
analytics.on_error = lambda error, batch: errors.append(str(error))
sent = []


def mid(name):
    message_id = f"{prefix}-{name}"
    sent.append(message_id)
    return message_id


anon, user = f"{prefix}-anon", f"{prefix}-user"
analytics.page(anonymous_id=anon, name="Pricing", properties={"url": "https://shop.example.com/pricing?utm_source=py"}, message_id=mid("page"))
analytics.track(anonymous_id=anon, event="Product Viewed", properties={"product_id": "P1"}, message_id=mid("track-anon"))
analytics.identify(user_id=user, anonymous_id=anon, traits={"email": f"{prefix}@Example.com", "plan": "pro"}, message_id=mid("identify"))
for i in range(12):
    analytics.track(user_id=user, event="Email Opened", properties={"i": i}, message_id=mid(f"track-{i}"))
analytics.screen(user_id=user, name="Home", message_id=mid("screen"))
analytics.group(user_id=user, group_id=f"{prefix}-company", traits={"name": "ACME"}, message_id=mid("group"))
analytics.alias(previous_id=f"{prefix}-old-device", user_id=user, message_id=mid("alias"))
analytics.flush()
analytics.shutdown()
if errors:
    print("errors: " + "; ".join(errors), file=sys.stderr)
    sys.exit(1)
print(json.dumps(sent))
