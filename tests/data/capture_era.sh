#!/usr/bin/env bash
# Capture real era_invalidate and dm-era status outputs into DIR (run as root on a kernel with dm-era).
# From the host:  python -c "from dmrepl.vm import run_in_vm; from pathlib import Path; \
#   run_in_vm('bash tests/data/capture_era.sh /tmp/era-out', rwdirs=[Path('/tmp/era-out')])"
set -euo pipefail
out=${1:?usage: capture_era.sh DIR}
work=$(mktemp -d /tmp/capture-era.XXXX)
trap 'dmsetup remove cap-gate cap-access cap-era cap-meta 2>/dev/null || true;
      losetup -d "${origin:-}" "${meta:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
truncate -s 64M "$work/origin"; truncate -s 4M "$work/meta"
origin=$(losetup --find --show "$work/origin"); meta=$(losetup --find --show "$work/meta")
osz=$(blockdev --getsz "$origin"); msz=$(blockdev --getsz "$meta")
echo "0 $msz linear $meta 0" | dmsetup create cap-meta --uuid DMREPL-capture-meta
echo "0 $osz era /dev/mapper/cap-meta $origin 128" | dmsetup create cap-era --uuid DMREPL-capture-era
echo "0 $osz linear /dev/mapper/cap-era 0" | dmsetup create cap-gate --uuid DMREPL-capture-gate
echo "0 $msz linear /dev/mapper/cap-meta 0" | dmsetup create cap-access --uuid DMREPL-capture-access
uname -r > "$out/kernel"
era_invalidate --version > "$out/era_invalidate.version"
dmsetup status cap-era > "$out/status-fresh.txt"
# block 3; blocks 10-12; block 20; last block (511)
for spec in "3 1" "10 3" "20 1" "511 1"; do
    read -r seek count <<<"$spec"
    dd if=/dev/urandom of=/dev/mapper/cap-gate bs=64K seek="$seek" count="$count" oflag=direct status=none
done
dmsetup status cap-era > "$out/status-before-take.txt"
dmsetup message cap-era 0 take_metadata_snap
dmsetup status cap-era > "$out/status-held.txt"
era_invalidate --metadata-snapshot --written-since 1 /dev/mapper/cap-access > "$out/written-since-1.xml"
era_invalidate --metadata-snapshot --written-since 2 /dev/mapper/cap-access > "$out/written-since-2-empty.xml"
set +e
era_invalidate --metadata-snapshot --written-since 1 /dev/mapper/cap-gate > "$out/error-not-metadata.stdout" 2> "$out/error-not-metadata.stderr"
echo $? > "$out/error-not-metadata.exit"
set -e
dmsetup message cap-era 0 drop_metadata_snap
set +e
dmsetup message cap-era 0 drop_metadata_snap 2> "$out/drop-when-none.stderr"; echo $? > "$out/drop-when-none.exit"
set -e
dmsetup status cap-era > "$out/status-dropped.txt"
echo captured
