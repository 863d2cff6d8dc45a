#!/usr/bin/env bash
# Servo's `actions/runner-select` (the queue-based one, spec §12 and issue 14's "The client,
# as facts"), re-created as bash for the tests: upload the args artifact, enqueue at the
# global queue, poll the take until runners are reserved, write the step's outputs, delete
# the artifact. Every failure ends in the GitHub-hosted fallback, as upstream's does.
#
# What stands in for GitHub: actions/upload-artifact becomes `POST <GITHUB_API_URL>/_standin/
# artifacts` (the stand-in's control route; its answer carries the artifact id, as
# upload-artifact@v4's `artifact-id` output does), and `gh api -X DELETE` becomes curl on
# GitHub's own `DELETE /repos/<repo>/actions/artifacts/<id>`.
#
# Environment (upstream's input in brackets):
#   QUEUE_URL              base URL of the queue, e.g. http://127.0.0.1:8002 (upstream:
#                          https://ci0.servo.org/queue); a trailing / is dropped
#   QUALIFIED_REPO         <owner>/<repo> [github.repository]
#   RUN_ID                 the workflow run id [github.run_id]
#   SELF_HOSTED_PROFILE    the profile key [self-hosted-image-name]
#   SELF_HOSTED_COUNT      runners wanted, default 1 [self-hosted-runner-count]
#   GITHUB_HOSTED_LABEL    the fallback label [github-hosted-runner-label]
#   GITHUB_HOSTED_COUNT    the fallback count, default 1 [github-hosted-runner-count]
#   FORCE_GITHUB_HOSTED    "true": fall back at once [force-github-hosted-runner]
#   NO_SELF_HOSTED_RUNNERS non-empty: fall back at once [the repository variable]
#   MAX_RETRY_TIME         seconds the take is retried, default 900 (Servo's production pin
#                          waits 3600; tests use a few seconds)
#   GITHUB_API_URL         the GitHub stand-in's base URL (artifact upload and delete)
#   GITHUB_TOKEN           the token the delete sends [GITHUB_TOKEN]
#   GITHUB_OUTPUT          optional; the output lines are appended to it as well
# Test hooks, not upstream's (each makes one of the queue's refusals reachable):
#   UNIQUE_ID              use this id instead of a new uuid
#   ARGS_PROFILE_KEY       the args file's profile key: self_hosted_image_name (default) or
#                          self_hosted_profile (the name an open upstream change gives it)
#   ARGS_ARTIFACT          "upload" (default) or "none": enqueue without an artifact
#   ARGS_CREATED_AT        the artifact's created_at (RFC 3339): a stale artifact
#   TAKE_UNIQUE_ID         poll the take for this id instead (an unknown id)
#   TAKE_TOKEN             poll the take with this token instead (a wrong token)
#   TAKE_QUEUE_URL         poll the take at this queue instead of QUEUE_URL (several queue
#                          processes sharing one PostgreSQL database: enqueue at one, poll
#                          another)
#   ENQUEUED_FILE          once enqueued, the unique id is written to this file (a test
#                          that enqueues clients in a known order waits for it)
#   TAKE_WHEN_FILE         once enqueued, wait until this file exists before the first take
#                          (a test kills and restarts the queue in between: curl does not
#                          retry a refused connection, so a take during the outage would end
#                          in the fallback)
#
# Output lines go to stdout (and $GITHUB_OUTPUT); everything else goes to stderr. On success:
#   unique_id=<uuid>
#   selected_runner_label=reserved-for:<uuid>
#   selected_runner_count=<SELF_HOSTED_COUNT>
#   selected_runner_indices=[1,…,SELF_HOSTED_COUNT]
#   runner_type_label=self-hosted-image:<SELF_HOSTED_PROFILE>
#   is_self_hosted=true
# otherwise:
#   unique_id=<uuid>
#   selected_runner_label=<GITHUB_HOSTED_LABEL>
#   selected_runner_count=<GITHUB_HOSTED_COUNT>
#   selected_runner_indices=[1,…,GITHUB_HOSTED_COUNT]
#   is_self_hosted=false
# The exit status is 0 either way; missing inputs or tools, or an artifact the stand-in
# refused (a broken test set-up, as a failed upload-artifact step fails the job), fail it.

set -euo pipefail

queue_url=${QUEUE_URL:?QUEUE_URL is required}
queue_url=${queue_url%/}
qualified_repo=${QUALIFIED_REPO:?QUALIFIED_REPO is required}
run_id=${RUN_ID:?RUN_ID is required}
self_hosted_profile=${SELF_HOSTED_PROFILE:?SELF_HOSTED_PROFILE is required}
self_hosted_count=${SELF_HOSTED_COUNT:-1}
github_hosted_label=${GITHUB_HOSTED_LABEL:?GITHUB_HOSTED_LABEL is required}
github_hosted_count=${GITHUB_HOSTED_COUNT:-1}
max_retry_time=${MAX_RETRY_TIME:-900}
args_profile_key=${ARGS_PROFILE_KEY:-self_hosted_image_name}
args_artifact=${ARGS_ARTIFACT:-upload}

for tool in curl jq; do
  if ! command -v "$tool" > /dev/null; then
    echo "$0: $tool is required" >&2
    exit 127
  fi
done
for number in "$self_hosted_count" "$github_hosted_count" "$max_retry_time"; do
  if ! [[ $number =~ ^[0-9]+$ ]]; then
    echo "$0: not a non-negative integer: $number" >&2
    exit 2
  fi
done

# Upstream: `unique_id=$(uuidgen)` (Debian: package uuid-runtime). Without it, the kernel's
# random uuid is the same kind of value (version 4).
if [ -n "${UNIQUE_ID:-}" ]; then
  unique_id=$UNIQUE_ID
elif command -v uuidgen > /dev/null; then
  unique_id=$(uuidgen)
elif [ -r /proc/sys/kernel/random/uuid ]; then
  unique_id=$(cat /proc/sys/kernel/random/uuid)
else
  unique_id=$(python3 -c 'import uuid; print(uuid.uuid4())')
fi

output() {
  echo "$1"
  if [ -n "${GITHUB_OUTPUT:-}" ]; then
    echo "$1" >> "$GITHUB_OUTPUT"
  fi
}

indices() {
  jq -cn --argjson n "$1" '[range(1; $n + 1)]'
}

result=$(mktemp)
artifact_id=
clean_up() {
  rm -f "$result"
  # Always delete the artifact; errors are ignored, as upstream's `gh api -X DELETE ... || true`.
  if [ -n "$artifact_id" ]; then
    curl -sS --connect-timeout 5 --max-time 30 -X DELETE \
      -H "Authorization: Bearer ${GITHUB_TOKEN:-}" \
      "${GITHUB_API_URL%/}/repos/$qualified_repo/actions/artifacts/$artifact_id" >&2 || true
  fi
}
trap clean_up EXIT

fall_back_to_github_hosted() {
  echo 'Falling back to GitHub-hosted runner' >&2
  output "unique_id=$unique_id"
  output "selected_runner_label=$github_hosted_label"
  output "selected_runner_count=$github_hosted_count"
  output "selected_runner_indices=$(indices "$github_hosted_count")"
  output 'is_self_hosted=false'
  exit 0
}

if [ -n "${NO_SELF_HOSTED_RUNNERS:-}" ] || [ "${FORCE_GITHUB_HOSTED:-false}" = true ]; then
  fall_back_to_github_hosted
fi

# The args artifact (spec §10.1): five lines, LF endings, one file named `args`.
if [ "$args_artifact" = upload ]; then
  github_api_url=${GITHUB_API_URL:?GITHUB_API_URL is required to upload the args artifact}
  args="unique_id=$unique_id
$args_profile_key=$self_hosted_profile
self_hosted_runner_count=$self_hosted_count
qualified_repo=$qualified_repo
run_id=$run_id
"
  upload=$(jq -n \
    --arg repo "$qualified_repo" --arg run_id "$run_id" --arg name "servo-ci-runners_$unique_id" \
    --arg args "$args" --arg created_at "${ARGS_CREATED_AT:-}" \
    '{qualified_repo: $repo, run_id: $run_id, name: $name, files: {args: $args}}
     + if $created_at == "" then {} else {created_at: $created_at} end')
  if ! uploaded=$(curl -sS --fail-with-body --connect-timeout 5 --max-time 30 -X POST \
      -H 'Content-Type: application/json' --data-binary "$upload" \
      "${github_api_url%/}/_standin/artifacts"); then
    echo "$0: the stand-in refused the args artifact: $uploaded" >&2
    exit 1
  fi
  artifact_id=$(jq -r .id <<< "$uploaded")
  echo "Uploaded artifact servo-ci-runners_$unique_id (id $artifact_id)" >&2
elif [ "$args_artifact" != none ]; then
  echo "$0: ARGS_ARTIFACT must be upload or none, not $args_artifact" >&2
  exit 2
fi

# Enqueue: no body, no auth, no retry. The whole answer is the token; it is pasted into the
# take's URL as it is (the queue must make it URL-safe). As upstream, the query values are not
# URL-encoded (a uuid, an owner/repo and a number need none).
enqueue_url="$queue_url/enqueue?unique_id=$unique_id&qualified_repo=$qualified_repo&run_id=$run_id"
echo "POST $enqueue_url" >&2
if ! token=$(curl -sS --fail-with-body --connect-timeout 5 --max-time 30 -X POST "$enqueue_url"); then
  echo "Enqueue failed: $token" >&2
  fall_back_to_github_hosted
fi
echo "Enqueued $unique_id" >&2
if [ -n "${ENQUEUED_FILE:-}" ]; then
  echo "$unique_id" > "$ENQUEUED_FILE"
fi
if [ -n "${TAKE_WHEN_FILE:-}" ]; then
  # At most MAX_RETRY_TIME: a test that failed must not leave the client waiting forever.
  for ((tenths = 0; tenths < max_retry_time * 10; tenths++)); do
    [ -e "$TAKE_WHEN_FILE" ] && break
    sleep 0.1
  done
fi

# Take: curl retries timeouts and 408/429/500/502/503/504 for up to $max_retry_time seconds,
# waiting Retry-After when the answer has one, else 1 s; 403, 404 and a refused connection are
# final. Each failed attempt's body is appended to $result (stdout is not rewound), so the
# final `jq -e .` fails after a success if any retried answer had a body.
take_queue_url=${TAKE_QUEUE_URL:-$queue_url}
take_url="${take_queue_url%/}/take/${TAKE_UNIQUE_ID:-$unique_id}?token=${TAKE_TOKEN:-$token}"
echo "POST $take_url" >&2
if curl -sS --fail-with-body --retry "$max_retry_time" --retry-delay 1 \
    --retry-max-time "$max_retry_time" --max-time 30 -X POST "$take_url" > "$result" \
  && jq -e . "$result" > /dev/null; then
  output "unique_id=$unique_id"
  output "selected_runner_label=reserved-for:$unique_id"
  output "selected_runner_count=$self_hosted_count"
  output "selected_runner_indices=$(indices "$self_hosted_count")"
  output "runner_type_label=self-hosted-image:$self_hosted_profile"
  output 'is_self_hosted=true'
  exit 0
fi

# Show what the queue said (an error message, or bodies of retried answers).
cat "$result" >&2
echo >&2
echo 'No self-hosted runners available!' >&2
fall_back_to_github_hosted
