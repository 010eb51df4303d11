#!/usr/bin/env bash
# A writer on primary while `dmrepl run` ships a cycle every 5 s, for SECONDS (default 60).
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
seconds=${1:-60}

writer primary start
step "primary: dmrepl run lab --interval 5s, for ${seconds} s"
# timeout sends SIGTERM: the loop finishes its cycle and exits; timeout then exits 124.
on_code primary "timeout -s TERM $seconds dmrepl run lab --interval 5s"
writer primary stop
step "one more cycle, with the writer stopped: every site at the last cut"
on primary 'dmrepl sync lab'
on primary 'dmrepl status lab'
