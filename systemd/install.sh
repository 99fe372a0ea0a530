#!/bin/sh
# Install the mqttfl agents as systemd services.
#   sudo sh systemd/install.sh [--dry-run] [--no-venv] [--package SPEC] [--python PY]
# DESTDIR=/some/root installs the tree below that directory instead (packaging, tests): no user is
# created, nothing is chown'ed and systemd is not reloaded, so it needs no root.
#
# Layout:
#   /opt/mqttfl/venv                  torch (CPU wheel, pinned) + mqttfl, root-owned, read-only to the agents
#   /etc/mqttfl/{cloud,NODE}.toml     one config per agent, root:mqttfl 0640
#   /etc/mqttfl/credentials/          root-only 0700: systemd reads NODE.password for LoadCredential=
#   /etc/mqttfl/examples/             config skeletons to copy
#   /etc/systemd/system/mqttfl-*.service
#   /var/lib/mqttfl                   created by systemd (StateDirectory=mqttfl), owned by mqttfl
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
DESTDIR=${DESTDIR:-}
dry_run=0
make_venv=1
package=$repo
python=${PYTHON:-python3}
torch_spec="torch==2.13.0"
# Without the CPU index pip pulls the CUDA build: gigabytes a Raspberry Pi or a CPU edge cannot use.
torch_index="https://download.pytorch.org/whl/cpu"

usage() {
    sed -n '2,3p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case $1 in
        --dry-run|-n) dry_run=1 ;;
        --no-venv) make_venv=0 ;;
        --package) [ $# -ge 2 ] || usage; package=$2; shift ;;
        --python) [ $# -ge 2 ] || usage; python=$2; shift ;;
        --torch) [ $# -ge 2 ] || usage; torch_spec=$2; shift ;;
        -h|--help) usage ;;
        *) echo "$0: unknown argument $1" >&2; usage ;;
    esac
    shift
done

run() {
    if [ "$dry_run" = 1 ]; then
        # Quote words with spaces so the printed line can be pasted back into a shell.
        line="+"
        for word in "$@"; do
            case $word in
                *" "*) line="$line '$word'" ;;
                *) line="$line $word" ;;
            esac
        done
        echo "$line"
    else
        "$@"
    fi
}

note() {
    echo "install.sh: $*"
}

if [ -z "$DESTDIR" ] && [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "$0: run as root (or set DESTDIR, or use --dry-run)" >&2
    exit 1
fi

root=$DESTDIR
venv=$root/opt/mqttfl/venv
etc=$root/etc/mqttfl
units=$root/etc/systemd/system

# 1. The service account: a system user with no login and no home of its own (HOME is the state dir).
if [ -n "$DESTDIR" ]; then
    note "DESTDIR set: not creating the mqttfl user"
elif getent passwd mqttfl >/dev/null 2>&1; then
    note "user mqttfl exists"
else
    run useradd --system --user-group --home-dir /var/lib/mqttfl --no-create-home \
        --shell /usr/sbin/nologin --comment "mqttfl agents" mqttfl
fi

# 2. The virtualenv. torch first, from the CPU index, so that installing mqttfl (which only asks for
# torch>=2.1) finds it satisfied and does not fetch a CUDA build.
if [ "$make_venv" = 1 ]; then
    run mkdir -p "$root/opt/mqttfl"
    run "$python" -m venv "$venv"
    run "$venv/bin/pip" install --quiet --upgrade pip
    run "$venv/bin/pip" install --quiet --index-url "$torch_index" "$torch_spec"
    run "$venv/bin/pip" install --quiet "$package"
else
    note "--no-venv: skipping $venv"
fi

# 3. Configuration and credentials. Existing configs are never overwritten.
run install -d -m 0750 "$etc"
run install -d -m 0700 "$etc/credentials"
run install -d -m 0755 "$etc/examples"
for f in cloud edge device; do
    run install -m 0644 "$here/examples/$f.toml" "$etc/examples/$f.toml"
done
if [ -e "$etc/cloud.toml" ]; then
    note "keeping existing $etc/cloud.toml"
else
    run install -m 0640 "$here/examples/cloud.toml" "$etc/cloud.toml"
fi
if [ -z "$DESTDIR" ]; then
    # The agents (group mqttfl) read their configs; only root reads the credentials directory.
    run chown root:mqttfl "$etc" "$etc/cloud.toml"
fi

# 4. Units.
run install -d -m 0755 "$units"
for u in mqttfl-cloud.service mqttfl-edge@.service mqttfl-device@.service; do
    run install -m 0644 "$here/$u" "$units/$u"
done

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
else
    note "not reloading systemd (DESTDIR set or systemd not running)"
fi

if [ "$dry_run" = 1 ]; then
    note "dry run: nothing was changed"
    exit 0
fi
cat <<MSG
install.sh: done. Next, per node (NODE = node id):
  broker host: sh broker_config/add-node.sh NODE   # hashes into the broker's password file
  node host:   install -m 0600 NODE.password /etc/mqttfl/credentials/NODE.password
               cp /etc/mqttfl/examples/edge.toml /etc/mqttfl/NODE.toml   # edit node, [mqtt]
               systemctl enable --now mqttfl-edge@NODE.service           # or mqttfl-device@, mqttfl-cloud
MSG
