#!/usr/bin/env bash
# Provision one lab node, as root, inside it (the Vagrantfile's shell provisioner; the
# repository is rsynced to /vagrant). Idempotent: `vagrant provision` runs it again.
#
#   provision.sh NODE NAME=IP,... PEER,... DISK=MiB,...
#
# 1. the packages dmrepl needs, from bin/install-deps (the list bin/setup installs too);
# 2. dmrepl in /opt/dmrepl (editable, from /vagrant), on PATH as /usr/local/bin/dmrepl;
# 3. the raw disks named /dev/lab/DISK by a udev rule (matched by their sizes);
# 4. /etc/hosts for the lab's names;
# 5. ssh: this node's key (made on the host by keys.sh) for its sites, and its peers' keys
#    allowed as root only through the receiver's forced command;
# 6. /etc/dmrepl/dmrepl.toml from lab-config.sh.
set -euo pipefail
if [ $# -ne 4 ]; then
    echo "usage: $0 NODE NAME=IP,... PEER,... DISK=MiB,..." >&2
    exit 2
fi
node=$1
IFS=, read -r -a hosts <<<"$2"
peers=$3
IFS=, read -r -a disks <<<"$4"
repo=/vagrant
say() { echo "provision $node: $*"; }

say "packages (bin/install-deps run)"
DMREPL_DEPS_NAME="provision $node" bash "$repo/bin/install-deps" run

say "dmrepl into /opt/dmrepl"
if [ ! -x /opt/dmrepl/bin/python ]; then
    python3 -m venv /opt/dmrepl
fi
/opt/dmrepl/bin/python -m pip install -q --disable-pip-version-check -e "$repo"
ln -sf /opt/dmrepl/bin/dmrepl /usr/local/bin/dmrepl

say "disks /dev/lab/*"
rules=/etc/udev/rules.d/61-dmrepl-lab.rules
{
    echo "# dmrepl's lab: the raw disks the Vagrantfile attaches, by size (provision.sh)"
    for pair in "${disks[@]}"; do
        sectors=$(( ${pair#*=} * 2048 ))
        echo "SUBSYSTEM==\"block\", ENV{DEVTYPE}==\"disk\", ATTR{size}==\"$sectors\", SYMLINK+=\"lab/${pair%%=*}\""
    done
} >"$rules"
udevadm control --reload
udevadm trigger --subsystem-match=block --action=add
udevadm settle
for pair in "${disks[@]}"; do
    if [ ! -b "/dev/lab/${pair%%=*}" ]; then
        echo "provision $node: no disk of ${pair#*=} MiB for /dev/lab/${pair%%=*}:" >&2
        lsblk -b -d -o NAME,SIZE,SERIAL >&2
        exit 1
    fi
done

say "/etc/hosts"
sed -i '/# dmrepl-lab$/d' /etc/hosts
for pair in "${hosts[@]}"; do
    # The box maps its own name to 127.0.1.1 (or 127.0.0.1): the lab's address wins.
    sed -i "/^127\.0\.[01]\.1[[:space:]].*\b${pair%%=*}\b/d" /etc/hosts
    echo "${pair#*=} ${pair%%=*} # dmrepl-lab" >>/etc/hosts
done

say "ssh keys and the receiver's forced command"
keys=$repo/vagrant/.keys
install -d -m 700 /root/.ssh
install -m 600 "$keys/$node" /root/.ssh/id_dmrepl_lab
install -m 644 "$keys/$node.pub" /root/.ssh/id_dmrepl_lab.pub
touch /root/.ssh/authorized_keys
sed -i '/ dmrepl-lab-[a-z0-9]*$/d' /root/.ssh/authorized_keys
IFS=, read -r -a peer_names <<<"$peers"
for peer in "${peer_names[@]}"; do
    echo "command=\"/usr/local/bin/dmrepl serve --stdio --group lab\",restrict $(cat "$keys/$peer.pub")" \
        >>/root/.ssh/authorized_keys
done
chmod 600 /root/.ssh/authorized_keys
cat >/etc/ssh/sshd_config.d/dmrepl-lab.conf <<'SSHD'
# dmrepl's lab (provision.sh): root logs in only through the forced command of its keys.
PermitRootLogin forced-commands-only
Match User root
    PasswordAuthentication no
    KbdInteractiveAuthentication no
    AllowTcpForwarding no
    X11Forwarding no
    PermitTTY no
    PermitUserRC no
SSHD
sshd -t
systemctl reload ssh

say "/etc/dmrepl/dmrepl.toml"
install -d -m 755 /etc/dmrepl
bash "$repo/vagrant/lab-config.sh" "$node" "$peers" >/etc/dmrepl/dmrepl.toml
: >/etc/dmrepl/lab_known_hosts
if [ -e /dev/mapper/data ] || [ -e /var/lib/dmrepl/promoted/lab.json ] || [ -e /var/lib/dmrepl/demoted/lab.json ]; then
    say "group lab is in use here: check-config's device checks skipped"
else
    dmrepl check-config
fi
install -d /mnt/lab
say "ready: $(dmrepl --version)"
