#!/usr/bin/env bash
# Runs `dwctl validate` on every workflow file under a folder (e.g. diffusers-workflow's own
# examples/ in a checkout of it) and sorts the outcomes: files that validate, files refused
# by name (a class, key, task or content type dw does not build), and any other error,
# which is printed in full. Exits 1 when there is any other error.
#
#   scripts/check-dw-examples.sh ~/src/diffusers-workflow/examples
set -euo pipefail
dir=${1:?usage: scripts/check-dw-examples.sh FOLDER}
here=$(cd "$(dirname "$0")/.." && pwd)
dwctl=${DWCTL:-$here/target/release/dwctl}
[ -x "$dwctl" ] || dwctl=$here/target/debug/dwctl
[ -x "$dwctl" ] || { echo "build dwctl first (cargo build --release)" >&2; exit 2; }

ok=0 refused=0 other=0
declare -A reasons
while IFS= read -r -d '' file; do
  if message=$("$dwctl" validate "$file" 2>&1 >/dev/null); then
    ok=$((ok + 1))
    continue
  fi
  first=$(printf '%s\n' "$message" | grep -v ': \(warning\|note\): ' | head -n 1)
  if [[ $first == *"is not supported"* || $first == *"unknown task command"* || $first == *"unsupported argument"* ]]; then
    refused=$((refused + 1))
    reason=$(printf '%s' "$first" | sed -E 's/^.*[0-9]+:[0-9]+: //; s/(is not supported( yet)?).*/\1/; s/;.*//')
    reasons[$reason]=$(( ${reasons[$reason]:-0} + 1 ))
  else
    other=$((other + 1))
    printf 'other error: %s\n' "$first"
  fi
done < <(find "$dir" -name '*.json' -print0 | sort -z)

echo "validate: $ok   refused by name: $refused   other errors: $other"
for reason in "${!reasons[@]}"; do
  printf '%5d  %s\n' "${reasons[$reason]}" "$reason"
done | sort -rn
[ "$other" -eq 0 ]
