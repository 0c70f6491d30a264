#!/usr/bin/env python3
"""Starts a sigrun run from Python: publishes a plain trigger (docs: trigger message format) with pika.

    SIGRUN__AMQP__URL=amqp://user:pass@broker:5672/%2f SIGRUN__AMQP__PREFIX=sigrun \
        examples/publish_trigger.py nightly-ubuntu [--version 2026.1127.0] [--from gallery-publish]

The message goes to exchange `{prefix}.work` with routing key `trigger` (the workers' queue
`{prefix}.triggers`), persistent, with a publisher confirm: the script exits 0 only once the broker
has taken responsibility for it. The broker URL and prefix are read from the same variables sigrun
reads. With --version the run id is known in advance (UUID v5 of `sigrun:{pipeline}:{version}`) and
printed; without it the pipeline's version scheme picks the version and `sigrun status` finds the run.
"""

import argparse
import json
import os
import sys
import uuid

import pika


def main():
    parser = argparse.ArgumentParser(description="Publish a sigrun trigger.")
    parser.add_argument("pipeline", help="the pipeline spec's `name`")
    parser.add_argument("--version", help="image version, e.g. 2026.1127.0 (default: the pipeline's scheme)")
    parser.add_argument("--from", dest="entry", help="entry stage, as `sigrun submit --from`")
    parser.add_argument("--image-version-id", help="roll out an existing gallery image version")
    args = parser.parse_args()

    url = os.environ.get("SIGRUN__AMQP__URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    prefix = os.environ.get("SIGRUN__AMQP__PREFIX", "sigrun")
    trigger = {"v": 1, "pipeline": args.pipeline}
    for key, value in (("version", args.version), ("from", args.entry), ("image_version_id", args.image_version_id)):
        if value is not None:
            trigger[key] = value

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange=f"{prefix}.work",
            routing_key="trigger",
            body=json.dumps(trigger).encode(),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=str(uuid.uuid4()),
            ),
        )
    except pika.exceptions.NackError:
        sys.exit(f"the broker refused the trigger (nack): is {prefix}.triggers full?")
    except pika.exceptions.ChannelClosedByBroker as error:
        # 404 NOT_FOUND: no exchange yet; the workers declare the topology when they start.
        sys.exit(f"publishing to {prefix}.work failed: {error.reply_code} {error.reply_text}")
    finally:
        if connection.is_open:
            connection.close()

    if args.version:
        run = uuid.uuid5(uuid.NAMESPACE_URL, f"sigrun:{args.pipeline}:{args.version}")
        print(run)
    else:
        print(f"trigger for {args.pipeline} published; `sigrun status` shows its run", file=sys.stderr)


if __name__ == "__main__":
    main()
