#!/usr/bin/env bash
# Bring the group up on primary, put an ext4 with a few files on it, seed every DR node.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

step "primary: the group's stacks, an ext4 on /dev/mapper/data"
on primary 'dmrepl up lab'
on primary 'blkid /dev/mapper/data >/dev/null || mkfs.ext4 -q -L lab /dev/mapper/data'
writer primary start
sleep 5
writer primary stop

for dr in "${DR_NODES[@]}"; do
    step "seed $dr (its disks are new, so all zeros: nothing is read there)"
    on primary "dmrepl seed lab --site $dr --target-zeroed"
done
on primary 'dmrepl status lab'
