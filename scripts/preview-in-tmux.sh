#!/usr/bin/env bash
# Shows what `dwctl watch --preview` does in a terminal, without needing one: runs
#   target/release/dwctl watch <copy of examples/tiny-sd.json> --preview -o <tmpdir>
# in a detached 120x40 tmux session (a private tmux server and a private dwd socket, both in
# a temporary directory), waits for the first run's line, edits the workflow's prompt and
# waits for the rerun's line, sends Ctrl-C with send-keys and waits for "stopped watching",
# then prints the pane twice: with its colours (`capture-pane -e`, view it in a 24-bit
# colour terminal) and as plain text. Finally it stops that dwd, kills the tmux server and
# removes the temporary directory.
#
# Preview protocol: half blocks unless DWCTL_PREVIEW is set (tmux's pane keeps text and
# colours, not kitty/iTerm2/sixel images). NO_COLOR is cleared inside the pane.
# Environment: PREVIEW_TIMEOUT (seconds to wait for the run, default 600),
# PREVIEW_KEEP=1 keeps the temporary directory (outputs, dwd log).
# Build first: cargo build --release -p dwctl -p dwd
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)
dwctl="$repo/target/release/dwctl"
timeout_s=${PREVIEW_TIMEOUT:-600}

if ! command -v tmux >/dev/null 2>&1; then
    echo "tmux is not installed; this script needs it (it installs nothing)" >&2
    exit 1
fi
if [[ ! -x $dwctl || ! -x $repo/target/release/dwd ]]; then
    echo "target/release/dwctl or dwd is missing; build with: cargo build --release -p dwctl -p dwd" >&2
    exit 1
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/dw-preview.XXXXXX")
export DWD_SOCKET="$tmp/dwd.sock"
tmux_sock="$tmp/tmux.sock"
session=dw-preview
t() { tmux -S "$tmux_sock" -f /dev/null "$@"; }

cleanup() {
    t kill-session -t "$session" 2>/dev/null || true
    t kill-server 2>/dev/null || true
    "$dwctl" stop >/dev/null 2>&1 || true
    if [[ ${PREVIEW_KEEP:-} == 1 ]]; then
        echo "kept $tmp" >&2
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

q() { printf '%q' "$1"; }
# The pane runs the command, reports its exit status, then stays open for capturing.
cmd="cd $(q "$repo") && env -u NO_COLOR DWD_SOCKET=$(q "$DWD_SOCKET")"
cmd+=" DWCTL_PREVIEW=$(q "${DWCTL_PREVIEW:-blocks}")"
flow="$tmp/flow.json"
sed "s#\.\./tests/fixtures#$repo/tests/fixtures#g" examples/tiny-sd.json > "$flow"
cmd+=" $(q "$dwctl") watch $(q "$flow") --preview -o $(q "$tmp/out")"
cmd+="; echo \"[dwctl exited with status \$?]\"; exec sleep 86400"

t new-session -d -s "$session" -x 120 -y 40 "$cmd"

capture() { t capture-pane -p -J -S - -t "$session" "$@"; }
drop_trailing_blank_lines() { awk '{ if ($0 == "") n++; else { for (; n > 0; n--) print ""; print } }'; }

# Waits until the pane shows PATTERN N times (grep -c), or fails.
wait_for() {
    local pattern=$1 count=$2 what=$3 deadline=$((SECONDS + timeout_s))
    until [[ $(capture | grep -c -- "$pattern") -ge $count ]]; do
        if capture | grep -q '^\[dwctl exited with status'; then
            echo "dwctl exited before $what" >&2
            return 1
        fi
        if ((SECONDS >= deadline)); then
            echo "no $what after ${timeout_s} s" >&2
            return 1
        fi
        sleep 0.25
    done
}

status=0
if wait_for '  loaded 4  ' 1 "the first run"; then
    sed -i 's/"prompt": "[^"]*"/"prompt": "a blue fox"/' "$flow"
    wait_for '  warm  ' 1 "the rerun after editing the prompt" || status=1
    t send-keys -t "$session" C-c
    wait_for 'stopped watching' 1 "a clean stop on Ctrl-C" || status=1
    wait_for '^\[dwctl exited with status 0\]' 1 "exit status 0" || status=1
else
    status=1
fi

echo "===== pane with colours (capture-pane -e) ====="
capture -e | drop_trailing_blank_lines
printf '\033[0m'
echo "===== pane as text ====="
capture | drop_trailing_blank_lines
exit "$status"
