#!/usr/bin/env bash
# Check every site of the node that is the primary now (default primary) against a fresh
# cut (dmrepl verify: exit 0 when they hold it, 19 when they differ), and the files the
# writer wrote on the primary's ext4.
#   verify.sh [NODE [SITE...]]     e.g. after switchover.sh: verify.sh dr back
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
node=${1:-primary}
shift || true
sites=("$@")
if [ ${#sites[@]} -eq 0 ]; then
    sites=("${DR_NODES[@]}")
fi
for site in "${sites[@]}"; do
    step "$node: verify site $site"
    on "$node" "dmrepl verify lab --site $site"
done
step "$node: the writer's files"
on "$node" '/vagrant/vagrant/scenarios/writer.sh check'
