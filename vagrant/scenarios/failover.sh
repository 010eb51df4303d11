#!/usr/bin/env bash
# Unplanned: the link dies while primary writes; dr is promoted with --force at the last
# cut it holds whole and takes writes. The link comes back: primary is demoted (what it
# wrote after that cut is listed and kept under /var/lib/dmrepl/discarded/), dr places it
# as its site `back` owed those ranges, and one cycle makes it equal to dr again.
# failback.sh returns the roles.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
primary_ip=$(on dr 'getent hosts primary' | tail -n 1 | cut -d' ' -f1)
dr_ip=$(on primary 'getent hosts dr' | tail -n 1 | cut -d' ' -f1)

writer primary start
on primary 'dmrepl sync lab'
step "the link dies; primary goes on writing, its cycles fail (site dr down)"
on primary "ip route add unreachable $dr_ip/32"
on dr "ip route add unreachable $primary_ip/32"
sleep 5
on_code primary 'dmrepl sync lab'
step "dr: dmrepl promote lab --site dr --force"
on dr 'dmrepl promote lab --site dr --force'
on dr '/vagrant/vagrant/scenarios/writer.sh check'
writer dr start

step "the link is back; primary stops writing and is demoted"
on primary "ip route del unreachable $dr_ip/32"
on dr "ip route del unreachable $primary_ip/32"
writer primary stop
on primary 'dmrepl demote lab --site dr'
step "dr: primary becomes its site back, owed what primary wrote after the cut"
copy_file primary /var/lib/dmrepl/demoted/lab.json dr /root/lab-demoted.json
on dr 'dmrepl reverse lab --site back --from /root/lab-demoted.json'
on dr 'dmrepl sync lab'
writer dr stop
on dr 'dmrepl sync lab'
on dr 'dmrepl verify lab --site back'
on dr 'dmrepl status lab'
