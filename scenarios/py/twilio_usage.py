"""The official twilio helper library for Python, pointed at voxgate: usage records and triggers.

Usage: twilio_usage.py BASE_URL ACCOUNT_SID AUTH_TOKEN COMMAND [ARGS]
  records                  -> JSON: this month's records, and all-time categories read 2 per page
  create CALLBACK_URL      -> JSON: the created trigger (count of calls >= 1, monthly)
  fetch UT...              -> JSON: the trigger as fetched
"""
import json
import sys

from twilio.rest import Client


def main() -> None:
    base, account, token, command, *args = sys.argv[1:]
    client = Client(account, token)
    # Every 2010-04-01 request (paging included) goes to voxgate instead of api.twilio.com.
    client.api.base_url = base
    if command == "records":
        month = client.usage.records.this_month.list()
        paged = client.usage.records.all_time.list(page_size=2)
        print(json.dumps({
            "this_month": [
                {"category": r.category, "count": r.count, "usage": r.usage, "usage_unit": r.usage_unit,
                 "price": str(r.price), "start_date": str(r.start_date), "end_date": str(r.end_date)}
                for r in month
            ],
            "all_time_categories": [r.category for r in paged],
        }))
    elif command == "create":
        t = client.usage.triggers.create(
            callback_url=args[0], trigger_value="1", usage_category="calls",
            trigger_by="count", recurring="monthly", friendly_name="from twilio-python")
        print(json.dumps({"sid": t.sid, "trigger_value": t.trigger_value, "recurring": t.recurring,
                          "usage_category": t.usage_category, "date_fired": str(t.date_fired)}))
    elif command == "fetch":
        t = client.usage.triggers(args[0]).fetch()
        listed = [x.sid for x in client.usage.triggers.list()]
        print(json.dumps({"sid": t.sid, "date_fired": None if t.date_fired is None else t.date_fired.isoformat(),
                          "current_value": t.current_value, "friendly_name": t.friendly_name, "listed": listed}))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
