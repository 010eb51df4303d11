#!/usr/bin/env bash
# On a lab node, as root: a writer for the scenarios. `start` mounts the group's device
# `data` on /mnt/lab and writes a file there every half second (each fsynced, listed with
# its SHA-256 in /mnt/lab/MANIFEST) and a numbered 4 KiB record to the device `log`, in the
# background; `stop` stops it and unmounts; `check` mounts, checks every file the manifest
# lists and unmounts.
set -euo pipefail
mnt=/mnt/lab
pidfile=/run/dmrepl-lab-writer.pid

mount_data() {
    mountpoint -q "$mnt" || mount /dev/mapper/data "$mnt"
}

case ${1:-} in
    start)
        mount_data
        mkdir -p "$mnt/w"
        if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            echo "writer: already running (pid $(cat "$pidfile"))"
            exit 0
        fi
        (
            n=$(find "$mnt/w" -type f | wc -l)
            while :; do
                n=$((n + 1))
                f=$mnt/w/$(hostname)-$n
                head -c $((RANDOM * 4)) /dev/urandom >"$f"
                sync "$f"
                (cd "$mnt" && sha256sum "w/${f##*/}") >>"$mnt/MANIFEST"
                sync "$mnt/MANIFEST"
                printf 'record %08d from %s\n' "$n" "$(hostname)" |
                    dd of=/dev/mapper/log bs=4096 seek=$((n % 32768)) conv=sync,fsync status=none
                sleep 0.5
            done
        ) </dev/null >/dev/null 2>&1 &
        echo $! >"$pidfile"
        echo "writer: started (pid $!)"
        ;;
    stop)
        if [ -f "$pidfile" ]; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
            rm -f "$pidfile"
            sleep 1
        fi
        if mountpoint -q "$mnt"; then
            umount "$mnt"
        fi
        echo "writer: stopped"
        ;;
    check)
        mount_data
        files=$(wc -l <"$mnt/MANIFEST")
        # A file written after the last cut is not on a replica, nor listed in its manifest.
        (cd "$mnt" && sha256sum --quiet -c MANIFEST)
        echo "writer: all $files files in the manifest match"
        umount "$mnt"
        ;;
    *)
        echo "usage: $0 start|stop|check" >&2
        exit 2
        ;;
esac
