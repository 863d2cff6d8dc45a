#!/usr/bin/env bash
# The decision step of Servo's `actions/runner-select-queueless` (spec §12), re-created for
# end-to-end tests: ask one monitor's tokenless `POST /select-runner` to reserve a runner, and
# print the step's outputs as GitHub output lines (`key=value`).
#
# Upstream loops over its servers in `shuf` order; this takes one base URL. Uploading the args
# artifact (`servo-ci-runners_<unique_id>`) is the caller's job, as is deleting it afterwards.
#
# Environment:
#   MONITOR_URL          base URL of the monitor, e.g. http://127.0.0.1:8000 (a trailing / is dropped)
#   UNIQUE_ID            the workload's unique id (upstream: uuidgen)
#   QUALIFIED_REPO       <owner>/<repo> (upstream: github.repository)
#   RUN_ID               the workflow run id (upstream: github.run_id)
#   SELF_HOSTED_IMAGE    the profile key, e.g. servo-ubuntu2204
#   GITHUB_HOSTED_LABEL  the fallback label, e.g. ubuntu-22.04
#   DISABLED             optional; "true" falls back at once, as upstream's init step decides
#   GITHUB_OUTPUT        optional; if set, the output lines are appended to it as well
#
# Output lines go to stdout (and $GITHUB_OUTPUT); everything else goes to stderr. On success:
#   selected_runner_label=reserved-for:<unique_id>
#   runner_type_label=self-hosted-image:<image>
#   is_self_hosted=true
# otherwise (any curl failure, an HTTP error, or a body that `jq -e .` finds false or null):
#   selected_runner_label=<GITHUB_HOSTED_LABEL>
#   runner_type_label=<GITHUB_HOSTED_LABEL>
#   is_self_hosted=false
# The exit status is 0 either way; only missing inputs or tools make it fail.

set -euo pipefail

monitor_url=${MONITOR_URL:?MONITOR_URL is required}
monitor_url=${monitor_url%/}
unique_id=${UNIQUE_ID:?UNIQUE_ID is required}
qualified_repo=${QUALIFIED_REPO:?QUALIFIED_REPO is required}
run_id=${RUN_ID:?RUN_ID is required}
self_hosted_image_name=${SELF_HOSTED_IMAGE:?SELF_HOSTED_IMAGE is required}
github_hosted_runner_label=${GITHUB_HOSTED_LABEL:?GITHUB_HOSTED_LABEL is required}
disabled=${DISABLED:-false}

for tool in curl jq; do
  if ! command -v "$tool" > /dev/null; then
    echo "$0: $tool is required" >&2
    exit 127
  fi
done

output() {
  echo "$1"
  if [ -n "${GITHUB_OUTPUT:-}" ]; then
    echo "$1" >> "$GITHUB_OUTPUT"
  fi
}

result=$(mktemp)
trap 'rm -f "$result"' EXIT

fall_back_to_github_hosted() {
  echo 'Falling back to GitHub-hosted runner' >&2
  output "selected_runner_label=$github_hosted_runner_label"
  output "runner_type_label=$github_hosted_runner_label"
  output 'is_self_hosted=false'
  exit 0
}

if [ "$disabled" = true ]; then
  fall_back_to_github_hosted
fi

# Use the monitor API to reserve a runner. If we get an array of runner details, we succeeded.
# If we get null, we failed. As upstream, the query values are not URL-encoded (a uuid, an
# owner/repo and a number need none).
take_runner_url="$monitor_url/select-runner?unique_id=$unique_id&qualified_repo=$qualified_repo&run_id=$run_id"
echo "POST $take_runner_url" >&2
# Both commands run as an `if` condition, so `set -e` does not end the script when either fails.
if curl -sS --fail-with-body --connect-timeout 5 --max-time 30 -X POST "$take_runner_url" \
    > "$result" \
  && jq -e . "$result" > /dev/null; then
  output "selected_runner_label=reserved-for:$unique_id"
  output "runner_type_label=self-hosted-image:$self_hosted_image_name"
  output 'is_self_hosted=true'
  exit 0
fi

# Show what the monitor said (an error message, or `null`).
cat "$result" >&2
echo >&2
echo 'No self-hosted runners available!' >&2
fall_back_to_github_hosted
