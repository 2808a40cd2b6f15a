"""The official twilio helper library for Python, pointed at voxgate: usage records and triggers,
numbers with their routing fields, real-time transcription of a running call.

Usage: twilio_client.py BASE_URL ACCOUNT_SID AUTH_TOKEN COMMAND [ARGS]
  records                  -> JSON: this month's records, and all-time categories read 2 per page
  create CALLBACK_URL      -> JSON: the created trigger (count of calls >= 1, monthly)
  fetch UT...              -> JSON: the trigger as fetched
  number PHONE VOICE_URL STATUS_URL FALLBACK_URL
                           -> JSON: the number created with voice_url and status_callback, then
                              updated with voice_fallback_url, as fetched
  transcribe CA... CALLBACK_URL NAME
                           -> JSON: the transcription started on the call (both tracks)
  stop CA... NAME          -> JSON: the transcription stopped by its name
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
    elif command == "number":
        phone, voice, status, fallback = args
        n = client.incoming_phone_numbers.create(phone_number=phone, voice_url=voice, status_callback=status)
        client.incoming_phone_numbers(n.sid).update(voice_fallback_url=fallback, voice_fallback_method="POST")
        n = client.incoming_phone_numbers(n.sid).fetch()
        print(json.dumps({"sid": n.sid, "phone_number": n.phone_number, "voice_url": n.voice_url,
                          "voice_method": n.voice_method, "status_callback": n.status_callback,
                          "voice_fallback_url": n.voice_fallback_url}))
    elif command == "transcribe":
        call, url, name = args
        t = client.calls(call).transcriptions.create(status_callback_url=url, name=name, track="both_tracks",
                                                     partial_results=False)
        print(json.dumps({"sid": t.sid, "name": t.name, "status": t.status, "call_sid": t.call_sid}))
    elif command == "stop":
        call, name = args
        t = client.calls(call).transcriptions(name).update(status="stopped")
        print(json.dumps({"sid": t.sid, "name": t.name, "status": t.status, "call_sid": t.call_sid}))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
