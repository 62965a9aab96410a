#!/bin/sh
# Send one snaphook hook event with plain curl, CloudEvents *structured* mode: the whole
# event is the JSON body (Content-Type: application/cloudevents+json). docs/platforms.md.
#
#   curl-structured.sh TYPE SUBJECT BACKUP_ID
#   curl-structured.sh backup.pre  shop/StatefulSet/db nightly-20250101
#   curl-structured.sh backup.post shop/StatefulSet/db nightly-20250101
#
# Environment:
#   SNAPHOOK_URL       dispatcher base URL (default http://127.0.0.1:8080)
#   SNAPHOOK_TOKEN     bearer token, if the dispatcher wants one (given to curl on stdin)
#   SNAPHOOK_SOURCE    CloudEvents source: the platform instance (default curl/<hostname>)
#   SNAPHOOK_WAIT      whole seconds to wait for the decision (default 30: ?wait=30);
#                      empty: do not wait, the answer is 202 Accepted
#   SNAPHOOK_OUTCOME   outcome of a *.post event: succeeded (default), failed, partial
#   SNAPHOOK_EVENT_ID  event id (default BACKUP_ID.TYPE, so sending again is the same run)
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

fail() { echo "$0: $*" >&2; exit 2; }
# The JSON is written by hand below: admit only characters that need no escaping.
for value in "$type" "$subject" "$backup_id" "$source" "$event_id"; do
  case $value in
    '' | *[!A-Za-z0-9._:/-]*) fail "invalid value '$value' (letters, digits and . _ : / - only)" ;;
  esac
done
case $wait in *[!0-9]*) fail "SNAPHOOK_WAIT must be whole seconds or empty" ;; esac
case $outcome in succeeded | failed | partial) ;; *) fail "invalid SNAPHOOK_OUTCOME '$outcome'" ;; esac

data="{\"backup\": {\"name\": \"$backup_id\", \"id\": \"$backup_id\"}"
case $type in *.post) data="$data, \"outcome\": \"$outcome\"" ;; esac
body="{\"specversion\": \"1.0\", \"id\": \"$event_id\", \"source\": \"$source\",
 \"type\": \"io.snaphook.$type\", \"subject\": \"$subject\",
 \"datacontenttype\": \"application/json\", \"data\": $data}}"

query=
if [ -n "$wait" ]; then query="?wait=$wait"; fi

# -H @- reads headers from stdin: a token on the command line is visible to other users.
answer=$(
  if [ -n "${SNAPHOOK_TOKEN:-}" ]; then printf 'Authorization: Bearer %s\n' "$SNAPHOOK_TOKEN"; fi |
    curl --silent --show-error --max-time "$((${wait:-0} + 10))" --header @- \
      --header 'Content-Type: application/cloudevents+json' --data-binary "$body" \
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
