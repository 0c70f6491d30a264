#!/usr/bin/env bash
# Starts a sigrun run from a shell: publishes a plain trigger with `amqp-publish` (Debian/Ubuntu
# package amqp-tools) to exchange `{prefix}.work`, routing key `trigger`, persistent, content type
# application/json.
#
#   SIGRUN__AMQP__URL=amqp://user:pass@broker:5672/%2f SIGRUN__AMQP__PREFIX=sigrun \
#       examples/publish_trigger.sh nightly-ubuntu [VERSION]
#
# amqp-publish has no publisher confirms: it exits 0 once the broker has closed the channel after
# the publish (so the exchange existed and the frame was handled), not once the message is stored.
# Where that matters, use publish_trigger.py (pika, confirmed) or `sigrun submit`.
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 PIPELINE [VERSION]" >&2
  exit 2
fi
pipeline=$1
version=${2:-}
url=${SIGRUN__AMQP__URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
prefix=${SIGRUN__AMQP__PREFIX:-sigrun}

# Pipeline names and versions are plain tokens ([A-Za-z0-9._-]); refuse anything that would need
# JSON escaping rather than build invalid JSON.
for value in "$pipeline" "$version"; do
  if [[ ! $value =~ ^[A-Za-z0-9._-]*$ ]]; then
    echo "$0: '$value' is not a plain name or version" >&2
    exit 2
  fi
done
if [ -n "$version" ]; then
  body=$(printf '{"v":1,"pipeline":"%s","version":"%s"}' "$pipeline" "$version")
else
  body=$(printf '{"v":1,"pipeline":"%s"}' "$pipeline")
fi

amqp-publish --url="$url" --exchange="$prefix.work" --routing-key=trigger \
  --persistent --content-type=application/json --body="$body"
echo "trigger for $pipeline${version:+ $version} published to $prefix.work" >&2
