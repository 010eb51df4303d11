# Sourced by the scenario scripts, which run on the host, in vagrant/ (they use `vagrant ssh`).
# shellcheck shell=bash
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export VAGRANT_CWD=$PWD

# The DR nodes: dr, and dr2 when the lab has it.
DR_NODES=(dr)
if [ "${DMREPL_LAB_DR2:-0}" = 1 ]; then
    DR_NODES+=(dr2)
fi

step() { printf '\n== %s\n' "$*"; }

# on NODE 'COMMAND': run COMMAND as root on NODE (a shell command line, one argument).
on() {
    local node=$1
    shift
    echo "[$node]# $*"
    vagrant ssh "$node" --no-tty -c "sudo bash -c $(printf '%q' "$*")"
}

# on_code NODE 'COMMAND': as on, but print the exit code instead of stopping on failure.
on_code() {
    local code=0
    on "$@" || code=$?
    echo "(exit $code)"
}

# copy_file FROM_NODE PATH TO_NODE PATH: a root-owned file from one node to another.
copy_file() {
    vagrant ssh "$1" --no-tty -c "sudo cat $(printf '%q' "$2")" |
        vagrant ssh "$3" --no-tty -c "sudo tee $(printf '%q' "$4") >/dev/null"
}

# The writer (scenarios/writer.sh) on NODE.
writer() { on "$1" "/vagrant/vagrant/scenarios/writer.sh $2"; }
