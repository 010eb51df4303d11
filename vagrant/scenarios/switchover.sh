#!/usr/bin/env bash
# Planned: primary hands the group to dr (the final cut shipped, primary demoted), dr is
# promoted and writes; dr then replicates back to primary (its site `back`), sending only
# what changed since the promotion. failback.sh returns the roles.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

step "primary: the gates closed, then dmrepl switchover lab --to dr"
writer primary stop
on primary 'dmrepl switchover lab --to dr'
step "dr: dmrepl promote lab --site dr"
on dr 'dmrepl promote lab --site dr'
on dr '/vagrant/vagrant/scenarios/writer.sh check'
writer dr start
step "dr: place primary as its site back, at the promotion's cut (primary's record)"
copy_file primary /var/lib/dmrepl/demoted/lab.json dr /root/lab-demoted.json
on dr 'dmrepl reverse lab --site back --from /root/lab-demoted.json'
sleep 5
on dr 'dmrepl sync lab'
writer dr stop
on dr 'dmrepl sync lab'
on dr 'dmrepl status lab'
