#!/usr/bin/env bash
# Print a lab node's /etc/dmrepl/dmrepl.toml (provision.sh installs it; the unit tests parse
# it). Every node holds the same group `lab` over its own disks and a grant to receive it, so
# that any node can become the primary:
#   primary: its sites are the DR nodes, by name, over ssh;
#   a DR node (dr, dr2): its site `back` is the primary, used once it is promoted (failback).
#
#   vagrant/lab-config.sh NODE PEER[,PEER...]
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 NODE PEER[,PEER...]" >&2
    exit 2
fi
node=$1
IFS=, read -r -a peers <<<"$2"

cat <<TOML
# dmrepl's lab: node $node (written by vagrant/provision.sh; vagrant/README.md)
[dmrepl]
state_dir = "/var/lib/dmrepl"

# The group this node replicates when it is the primary. /dev/lab/* are the lab's raw
# disks (a udev rule from provision.sh names them).
[group.lab]
block_size = "64KiB"
spool_size = "512MiB"

[group.lab.device.data]
origin = "/dev/lab/data"
metadata = "/dev/lab/meta"
metadata_offset = "0"
metadata_size = "4MiB"

[group.lab.device.log]
origin = "/dev/lab/log"
metadata = "/dev/lab/meta"
metadata_offset = "8MiB"
metadata_size = "4MiB"
TOML

site() {  # NAME HOST: an ssh site whose replicas are the same disks on HOST
    cat <<TOML

[group.lab.site.$1]
transport = "ssh"
host = "$2"
user = "root"
identity = "/root/.ssh/id_dmrepl_lab"
# A lab's shortcut: a host key is trusted on first use; provision.sh empties this file, so
# a node that was destroyed and made again is trusted anew after \`vagrant provision\`.
ssh_options = ["-o", "StrictHostKeyChecking=accept-new",
               "-o", "UserKnownHostsFile=/etc/dmrepl/lab_known_hosts",
               "-o", "ConnectTimeout=10"]
compress = "zstd"
stall_timeout = "30s"
[group.lab.site.$1.replica]
data = "/dev/lab/data"
log = "/dev/lab/log"
TOML
}

if [ "$node" = primary ]; then
    for peer in "${peers[@]}"; do
        site "$peer" "$peer"
    done
else
    site back primary
fi

cat <<TOML

# What another node may write here (dmrepl serve, the forced command of its key): this
# node's own disks, as a DR host before a failover, or as the old primary after one.
[receive.lab]
journal = "/dev/lab/journal"
[receive.lab.replica]
data = "/dev/lab/data"
log = "/dev/lab/log"
TOML
