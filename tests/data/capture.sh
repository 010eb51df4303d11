#!/bin/bash
# Capture `dmsetup table` and `dmsetup status` of every device-mapper target dmrepl models,
# built on loop devices over small sparse files, for the parser fixtures in tests/data/dmsetup.
#
# Run as root on a kernel with device-mapper (dm-era, dm-snapshot, dm-mirror, dm-flakey,
# dm-delay, dm-zero loaded), e.g. in the test VM; see tests/data/README.md.
#
#   bash tests/data/capture.sh OUTDIR
#
# For every case CASE it writes into OUTDIR:
#   CASE.input   the table as loaded (device paths as typed)
#   CASE.table   `dmsetup table` output (the kernel's canonical form, devices as MAJ:MIN)
#   CASE.status  `dmsetup status` output
#   CASE.devices "PATH MAJ:MIN" of every device path in CASE.input, at capture time
#   CASE.error   stderr of a table the kernel refused (then no .table/.status)
# plus `uname`, `targets`, `versions` and `kernel-log` (the kernel's device-mapper messages).
# Everything it creates carries the prefix dmcap- and is torn down on exit.
# Never sends a message or asks the status of a suspended era device (that hangs).

set -u
OUT=${1:?usage: capture.sh OUTDIR}
mkdir -p "$OUT"
rm -f "$OUT"/*.input "$OUT"/*.table "$OUT"/*.status "$OUT"/*.error "$OUT"/*.devices
WORK=$(mktemp -d /tmp/dmcap.XXXXXX)
PREFIX=dmcap-
T=30 # seconds before a single command is given up on
LOOPS=()
DMS=()

log() { echo "capture: $*" >&2; }

majmin() {
    # The kernel prints devices as "%u:%u" (format_dev_t); stat gives the numbers in hex.
    local path=$1
    printf '%d:%d' "0x$(stat -L -c %t "$path")" "0x$(stat -L -c %T "$path")"
}

mkloop() { # VAR NAME SIZE_MIB: attach a sparse file, store /dev/loopN in VAR
    local file=$WORK/$2.img dev
    truncate -s "$3M" "$file"
    dev=$(losetup --find --show "$file") || exit 1
    LOOPS+=("$dev")
    printf -v "$1" '%s' "$dev"
}

mapper() { echo "/dev/mapper/$PREFIX$1"; }

create() { # NAME TABLE: create a dm device; returns non-zero (and keeps stderr) if refused
    local name=$1 table=$2
    printf '%s\n' "$table" >"$WORK/input.$name"
    if timeout $T dmsetup create "$PREFIX$name" --uuid "DMREPL-capture-$name" \
        <"$WORK/input.$name" 2>"$WORK/err.$name"; then
        DMS+=("$name")
        return 0
    fi
    log "create $name refused: $(cat "$WORK/err.$name")"
    return 1
}

reload() { # NAME TABLE: swap the live table (suspend + resume in one step)
    local name=$1 table=$2
    printf '%s\n' "$table" >"$WORK/input.$name"
    timeout $T dmsetup reload "$PREFIX$name" <"$WORK/input.$name" &&
        timeout $T dmsetup resume "$PREFIX$name"
}

capture() { # CASE NAME: save input, table and status of device NAME under CASE
    local case=$1 name=$2
    if ! dmsetup info "$PREFIX$name" >/dev/null 2>&1; then
        log "capture $case: no device $name"
        return 1
    fi
    cp "$WORK/input.$name" "$OUT/$case.input"
    grep -o '/dev/[^ ]*' "$OUT/$case.input" | sort -u | while read -r path; do
        echo "$path $(majmin "$path")"
    done >"$OUT/$case.devices"
    timeout $T dmsetup table "$PREFIX$name" >"$OUT/$case.table"
    timeout $T dmsetup status "$PREFIX$name" >"$OUT/$case.status"
}

try_case() { # CASE TABLE: create, capture, remove; keeps the kernel's refusal as CASE.error
    local case=$1 table=$2 name=try-$1
    if create "$name" "$table"; then
        capture "$case" "$name"
        remove "$name"
    else
        cp "$WORK/input.$name" "$OUT/$case.input"
        cp "$WORK/err.$name" "$OUT/$case.error"
    fi
}

remove() {
    local name=$1 i
    timeout $T dmsetup remove --retry "$PREFIX$name" || log "remove $name failed"
    for i in "${!DMS[@]}"; do
        [[ ${DMS[$i]} == "$name" ]] && unset 'DMS[i]'
    done
    DMS=("${DMS[@]}")
}

teardown() {
    local i name
    for ((i = ${#DMS[@]} - 1; i >= 0; i--)); do
        name=$PREFIX${DMS[$i]}
        if [[ $(dmsetup info -c --noheadings -o suspended "$name" 2>/dev/null) == Suspended ]]; then
            timeout $T dmsetup resume "$name"
        fi
        timeout $T dmsetup remove --retry "$name" || log "teardown: cannot remove $name"
    done
    for dev in "${LOOPS[@]}"; do losetup --detach "$dev"; done
    rm -rf "$WORK"
}
trap teardown EXIT

sectors() { blockdev --getsz "$1"; }

write_mib() { # DEV OFFSET_MIB COUNT_MIB: direct writes, bounded in time
    timeout $T dd if=/dev/urandom of="$1" bs=1M seek="$2" count="$3" oflag=direct \
        conv=fsync status=none || log "write to $1 failed (may be expected)"
}

wait_mirror_sync() { # NAME: until <in_sync>/<regions> shows all regions in sync (max 120 s)
    local i counts
    for ((i = 0; i < 240; i++)); do
        counts=$(dmsetup status "$PREFIX$1" | awk '{ for (f = 4; f <= NF; f++) if ($f ~ /^[0-9]+\/[0-9]+$/) { print $f; exit } }')
        [[ -n $counts && ${counts%/*} == "${counts#*/}" ]] && return 0
        sleep 0.5
    done
    log "mirror $1 did not reach sync: $counts"
}

uname -r >"$OUT/uname"
dmsetup targets >"$OUT/targets"
dmsetup version >"$OUT/versions"

mkloop A a 16
mkloop B b 16
mkloop C c 16
mkloop D d 16
mkloop LOGDEV log 1
mkloop META meta 4
mkloop COW cow 8
mkloop SMALLCOW smallcow 1
mkloop O2 origin2 16
S=$(sectors "$A") # 16 MiB = 32768 sectors

# --- simple targets ---------------------------------------------------------------------
try_case linear "0 $S linear $A 0"
try_case linear-offset "0 2048 linear $B 4096"
try_case linear-multi "0 1024 linear $A 0
1024 2048 linear $B 2048
3072 1024 zero
4096 1024 error"
try_case zero "0 $S zero"
try_case error "0 $S error"

# --- era --------------------------------------------------------------------------------
create era-meta "0 $(sectors "$META") linear $META 0"
create era "0 $S era $(mapper era-meta) $A 128"
capture era era
write_mib "$(mapper era)" 1 2
timeout $T dmsetup message "${PREFIX}era" 0 take_metadata_snap
capture era-held era
timeout $T dmsetup message "${PREFIX}era" 0 drop_metadata_snap
remove era
remove era-meta

# --- snapshot-origin and snapshots ------------------------------------------------------
create origin "0 $S snapshot-origin $A"
timeout $T dmsetup suspend "${PREFIX}origin"
create snap "0 $S snapshot $A $COW P 8"
create snap-n "0 $S snapshot $A $C n 16" # lower-case flag: how is it echoed?
timeout $T dmsetup resume "${PREFIX}origin"
capture snapshot-fresh snap
write_mib "$(mapper origin)" 0 2
capture snapshot-origin origin
capture snapshot snap
capture snapshot-transient snap-n
remove snap-n
remove snap

timeout $T dmsetup suspend "${PREFIX}origin"
create snap-discard "0 $S snapshot $A $COW P 8 2 discard_zeroes_cow discard_passdown_origin" ||
    cp "$WORK/err.snap-discard" "$OUT/snapshot-discard.error"
timeout $T dmsetup resume "${PREFIX}origin"
if [[ -e $(mapper snap-discard) ]]; then
    capture snapshot-discard snap-discard
    remove snap-discard
fi
remove origin

# Overflow: a PO snapshot whose own writes exceed the COW stays valid but reports Overflow.
create origin2 "0 $S snapshot-origin $O2"
timeout $T dmsetup suspend "${PREFIX}origin2"
create snap-po "0 $S snapshot $O2 $SMALLCOW PO 8"
timeout $T dmsetup resume "${PREFIX}origin2"
write_mib "$(mapper snap-po)" 0 2
capture snapshot-overflow snap-po
# Invalid: origin writes the COW cannot hold invalidate a P snapshot (and the PO one).
create smallcow2 "0 1024 linear $D 0" # a 512 KiB COW
timeout $T dmsetup suspend "${PREFIX}origin2"
create snap-inv "0 $S snapshot $O2 $(mapper smallcow2) P 8"
timeout $T dmsetup resume "${PREFIX}origin2"
write_mib "$(mapper origin2)" 4 4
capture snapshot-invalid snap-inv
capture snapshot-overflow-then-origin-write snap-po
remove snap-inv
remove smallcow2
remove snap-po
remove origin2

# --- mirror -----------------------------------------------------------------------------
# Resync slowed down by a delay target under the second leg, to see it part-way.
create slowleg "0 $S delay $C 0 0 $C 0 200"
create mirror-core "0 $S mirror core 1 1024 2 $B 0 $(mapper slowleg) 0"
sleep 1
capture mirror-core-resyncing mirror-core
capture delay-busy slowleg
wait_mirror_sync mirror-core
remove mirror-core
remove slowleg
create mirror-core "0 $S mirror core 1 1024 2 $B 0 $C 0"
wait_mirror_sync mirror-core
capture mirror-core mirror-core
remove mirror-core

try_case mirror-core-nosync "0 $S mirror core 2 1024 nosync 2 $B 0 $C 0 1 handle_errors"
try_case mirror-core-sync "0 $S mirror core 2 512 sync 2 $B 0 $C 0"
try_case mirror-core-3legs "0 $S mirror core 2 2048 nosync 3 $B 0 $C 0 $D 0 2 handle_errors keep_log"
try_case mirror-keep-log-alone "0 $S mirror core 2 1024 nosync 2 $B 0 $C 0 1 keep_log"
try_case mirror-features-reversed "0 $S mirror core 2 1024 nosync 2 $B 0 $C 0 2 keep_log handle_errors"

create mlog "0 $(sectors "$LOGDEV") linear $LOGDEV 0"
create mirror-disk "0 $S mirror disk 2 $(mapper mlog) 1024 2 $B 0 $C 0 1 handle_errors"
wait_mirror_sync mirror-disk
capture mirror-disk mirror-disk
remove mirror-disk
try_case mirror-disk-nosync "0 $S mirror disk 3 $(mapper mlog) 1024 nosync 2 $B 0 $C 0"

# A leg that fails writes: D. Without handle_errors the write still succeeds on the other leg.
create leg2 "0 $S linear $C 0"
create mirror-dead "0 $S mirror core 2 1024 nosync 2 $B 0 $(mapper leg2) 0"
reload leg2 "0 $S error"
write_mib "$(mapper mirror-dead)" 0 1
capture mirror-leg-dead mirror-dead
remove mirror-dead

# The same with handle_errors keep_log (failed writes complete, none held) on a flakey leg.
reload leg2 "0 $S flakey $C 0 0 60"
capture flakey-always-down leg2
create mirror-flaky "0 $S mirror disk 3 $(mapper mlog) 1024 nosync 2 $B 0 $(mapper leg2) 0 2 handle_errors keep_log"
write_mib "$(mapper mirror-flaky)" 2 1
capture mirror-leg-dead-handled mirror-flaky
remove mirror-flaky

# A default leg that fails reads: R, reads retried on the other leg. (6.1's flakey passes
# reads through when drop_writes is set, so it is a plain flakey that errors all I/O.)
create leg1 "0 $S linear $B 0"
reload leg2 "0 $S linear $C 0"
create mirror-read "0 $S mirror core 2 1024 nosync 2 $(mapper leg1) 0 $(mapper leg2) 0 1 handle_errors"
reload leg1 "0 $S flakey $B 0 0 60"
timeout $T dd if="$(mapper mirror-read)" of=/dev/null bs=64k count=16 iflag=direct status=none ||
    log "read from mirror-read failed"
capture mirror-leg-read-error mirror-read
remove mirror-read

# A leg that fails from the start: resync writes fail, S.
reload leg2 "0 $S error"
create mirror-sync-err "0 $S mirror core 1 1024 2 $B 0 $(mapper leg2) 0"
sleep 5
capture mirror-leg-sync-error mirror-sync-err
remove mirror-sync-err
reload leg2 "0 $S flakey $C 0 0 60"
create mirror-sync-err "0 $S mirror core 1 1024 2 $B 0 $(mapper leg2) 0 1 handle_errors"
sleep 5
capture mirror-leg-sync-error-handled mirror-sync-err
remove mirror-sync-err

# A failed disk log: the log's health goes from A to D (or F on a failed flush).
create mlog2 "0 $(sectors "$LOGDEV") linear $LOGDEV 0"
create mirror-badlog "0 $S mirror disk 3 $(mapper mlog2) 1024 nosync 2 $B 0 $C 0"
reload mlog2 "0 $(sectors "$LOGDEV") error"
write_mib "$(mapper mirror-badlog)" 0 1
capture mirror-disklog-dead mirror-badlog
remove mirror-badlog
remove mlog2
remove leg1
remove leg2
remove mlog

# --- flakey -----------------------------------------------------------------------------
try_case flakey "0 $S flakey $A 0 5 5"
try_case flakey-zero-features "0 $S flakey $A 0 0 5 0"
try_case flakey-offset "0 2048 flakey $A 8 3600 0"
try_case flakey-drop-writes "0 $S flakey $A 0 5 5 1 drop_writes"
try_case flakey-error-writes "0 $S flakey $A 0 5 5 1 error_writes"
try_case flakey-error-reads "0 $S flakey $A 0 5 5 1 error_reads"
try_case flakey-corrupt "0 $S flakey $A 0 5 5 5 corrupt_bio_byte 32 w 1 0"
try_case flakey-corrupt-read-drop "0 $S flakey $A 0 5 5 6 corrupt_bio_byte 7 r 255 0 drop_writes"
try_case flakey-drop-and-error "0 $S flakey $A 0 5 5 2 drop_writes error_writes"
try_case flakey-random-read "0 $S flakey $A 0 5 5 2 random_read_corrupt 100"

# --- delay ------------------------------------------------------------------------------
try_case delay "0 $S delay $A 0 10"
try_case delay-write "0 $S delay $A 0 10 $B 0 20"
try_case delay-write-same "0 $S delay $A 0 0 $A 0 0"
try_case delay-flush "0 2048 delay $A 0 10 $B 16 20 $A 8 5"

dmesg | grep -E 'device-mapper|Buffer I/O error on dev dm-' | sed 's/^\[ *[0-9.]*\] //' >"$OUT/kernel-log"
log "done: $(find "$OUT" -mindepth 1 -maxdepth 1 | wc -l) files in $OUT"
