#!/bin/sh
# Send one snaphook hook event with plain curl, CloudEvents *binary* mode: the attributes
# are ce-* headers, the body is only the event's data (Content-Type: application/json).
# docs/platforms.md. Same arguments, environment and exit status as curl-structured.sh:
#
#   curl-binary.sh TYPE SUBJECT BACKUP_ID
#   curl-binary.sh backup.pre  shop/StatefulSet/db nightly-20250101
#   curl-binary.sh backup.post shop/StatefulSet/db nightly-20250101
#
# Environment: SNAPHOOK_URL, SNAPHOOK_TOKEN, SNAPHOOK_SOURCE, SNAPHOOK_WAIT (default 30,
# empty = do not wait), SNAPHOOK_OUTCOME, SNAPHOOK_EVENT_ID (see curl-structured.sh), and
# TRACEPARENT: a W3C trace context, sent as ce-traceparent and copied onto the reply event.
#
# Exit status, as `snaphook emit`: 0 allowed (or accepted), 1 denied, 2 error.
set -eu

if [ $# -ne 3 ]; then
  echo "usage: $0 TYPE SUBJECT BACKUP_ID (e.g. backup.pre shop/StatefulSet/db nightly-1)" >&2
  exit 2
fi
type=$1 subject=$2 backup_id=$3
url=${SNAPHOOK_URL:-http://127.0.0.1:8080}
source=${SNAPHOOK_SOURCE:-curl/$(hostname)}
wait=${SNAPHOOK_WAIT-30}
event_id=${SNAPHOOK_EVENT_ID:-$backup_id.$type}
outcome=${SNAPHOOK_OUTCOME:-succeeded}
traceparent=${TRACEPARENT:-}

fail() { echo "$0: $*" >&2; exit 2; }
# Header values and the JSON are written by hand: admit only characters that need no escaping.
for value in "$type" "$subject" "$backup_id" "$source" "$event_id"; do
  case $value in
    '' | *[!A-Za-z0-9._:/-]*) fail "invalid value '$value' (letters, digits and . _ : / - only)" ;;
  esac
done
case $traceparent in *[!0-9a-f-]*) fail "TRACEPARENT is not a W3C traceparent" ;; esac
case $wait in *[!0-9]*) fail "SNAPHOOK_WAIT must be whole seconds or empty" ;; esac
case $outcome in succeeded | failed | partial) ;; *) fail "invalid SNAPHOOK_OUTCOME '$outcome'" ;; esac

data="{\"backup\": {\"name\": \"$backup_id\", \"id\": \"$backup_id\"}"
case $type in *.post) data="$data, \"outcome\": \"$outcome\"" ;; esac
data="$data}"

query=
if [ -n "$wait" ]; then query="?wait=$wait"; fi

# Every header goes to curl on stdin (-H @-), the token among them: command lines are
# visible to other users.
answer=$(
  {
    printf 'ce-specversion: 1.0\nce-id: %s\nce-source: %s\n' "$event_id" "$source"
    printf 'ce-type: io.snaphook.%s\nce-subject: %s\n' "$type" "$subject"
    if [ -n "$traceparent" ]; then printf 'ce-traceparent: %s\n' "$traceparent"; fi
    if [ -n "${SNAPHOOK_TOKEN:-}" ]; then printf 'Authorization: Bearer %s\n' "$SNAPHOOK_TOKEN"; fi
  } | curl --silent --show-error --max-time "$((${wait:-0} + 10))" --header @- \
    --header 'Content-Type: application/json' --data-binary "$data" \
    --write-out '\n%{http_code}' "$url/v1/events$query"
) || fail "cannot reach $url"

status=${answer##*"
"}
answer=${answer%"
"*}
printf '%s\n' "$answer"
case $status in 2??) ;; *) fail "$url answered $status" ;; esac
# Waited for, the answer is the decision, {"allowed": true|false, "reason": ..., ...}: read
# its first member rather than search the text (a step's error message could contain anything).
if [ -n "$wait" ]; then
  case $answer in '{"allowed": true'*) ;; *) exit 1 ;; esac
fi
exit 0
