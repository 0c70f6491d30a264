#!/usr/bin/env python3
"""Starts a sigrun run with a CloudEvents 1.0 event (structured mode), as a CI system or an
event router would: type `io.sigrun.trigger.v1`, `data` = the plain trigger. The event is built and
serialized by the CloudEvents Python SDK (its RabbitMQ binding, structured mode) and published with pika to `{prefix}.work`, routing key
`trigger`, persistent, content type `application/cloudevents+json`, with a publisher confirm.

    SIGRUN__AMQP__URL=… SIGRUN__AMQP__PREFIX=sigrun \
        examples/publish_cloudevent.py nightly-ubuntu [--version 2026.1127.0] [--source /ci/image-build]

Prints the run id when --version is given (UUID v5 of `sigrun:{pipeline}:{version}`).
"""

import argparse
import os
import sys
import uuid

import pika
from cloudevents.core.bindings.rabbitmq import to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent


def main():
    parser = argparse.ArgumentParser(description="Publish a sigrun trigger as a CloudEvent.")
    parser.add_argument("pipeline")
    parser.add_argument("--version")
    parser.add_argument("--from", dest="entry")
    parser.add_argument("--source", default="/examples/publish_cloudevent", help="the event's `source`")
    args = parser.parse_args()

    url = os.environ.get("SIGRUN__AMQP__URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    prefix = os.environ.get("SIGRUN__AMQP__PREFIX", "sigrun")
    data = {"v": 1, "pipeline": args.pipeline}
    if args.version:
        data["version"] = args.version
    if args.entry:
        data["from"] = args.entry
    # The SDK fills in `specversion` 1.0, a fresh `id` and `time`.
    event = CloudEvent(
        {"type": "io.sigrun.trigger.v1", "source": args.source, "datacontenttype": "application/json"},
        data,
    )
    message = to_structured(event, JSONFormat())

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange=f"{prefix}.work",
            routing_key="trigger",
            body=message.body,
            properties=pika.BasicProperties(
                content_type=message.content_type,
                headers=message.headers or None,
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=event.get_id(),
            ),
        )
    except pika.exceptions.NackError:
        sys.exit(f"the broker refused the event (nack): is {prefix}.triggers full?")
    except pika.exceptions.ChannelClosedByBroker as error:
        sys.exit(f"publishing to {prefix}.work failed: {error.reply_code} {error.reply_text}")
    finally:
        if connection.is_open:
            connection.close()

    if args.version:
        print(uuid.uuid5(uuid.NAMESPACE_URL, f"sigrun:{args.pipeline}:{args.version}"))
    else:
        print(f"event {event.get_id()} published", file=sys.stderr)


if __name__ == "__main__":
    main()
