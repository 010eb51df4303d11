#!/usr/bin/env bash
# On the host, before `vagrant up`/`provision` (a trigger in the Vagrantfile): one ed25519
# key per lab node for dmrepl's ssh transport, in vagrant/.keys (ignored by git). They reach
# the nodes through the rsynced repository; provision.sh installs each node's own private
# key and the others' public keys, pinned to the receiver's forced command. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p .keys
chmod 700 .keys
for node in primary dr dr2; do
    if [ ! -f ".keys/$node" ]; then
        ssh-keygen -q -t ed25519 -N "" -C "dmrepl-lab-$node" -f ".keys/$node"
    fi
done
