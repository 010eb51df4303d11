#!/usr/bin/env bash
# After switchover.sh or failover.sh (dr is the primary, primary its site back): a planned
# switchover back to primary, which then replicates to dr again from where dr is.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"

step "dr: the gates closed, then dmrepl switchover lab --to back"
writer dr stop
on dr 'dmrepl switchover lab --to back'
step "primary: dmrepl promote lab --site back"
on primary 'dmrepl promote lab --site back'
on primary '/vagrant/vagrant/scenarios/writer.sh check'
step "primary: dr becomes its site dr again, at the promotion's cut (dr's record)"
copy_file dr /var/lib/dmrepl/demoted/lab.json primary /root/lab-demoted.json
on primary 'dmrepl reverse lab --site dr --from /root/lab-demoted.json'
on primary 'dmrepl sync lab'
on primary 'dmrepl status lab'
