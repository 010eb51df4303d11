#!/usr/bin/env bash
# Cut the link from primary to dr for SECONDS (default 30) while the writer goes on: dr is
# `down` (exit 17), dr2 if any keeps going, the spool holds what dr still needs; the link
# comes back and the next cycle catches dr up.
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
seconds=${1:-30}
dr_ip=$(on primary 'getent hosts dr' | tail -n 1 | cut -d' ' -f1)

writer primary start
step "cut: primary has no route to dr ($dr_ip)"
on primary "ip route add unreachable $dr_ip/32"
end=$((SECONDS + seconds))
while [ "$SECONDS" -lt "$end" ]; do
    on_code primary 'dmrepl sync lab'
    sleep 5
done
on primary 'dmrepl status lab'
step "the link is back"
on primary "ip route del unreachable $dr_ip/32"
on_code primary 'dmrepl sync lab'
writer primary stop
on primary 'dmrepl sync lab'
on primary 'dmrepl status lab'
