#!/bin/sh
# Add (or re-key) one node in the broker's password file.
#   add-node.sh [-d DIR] [-p PASSWD_FILE] [-c CRED_DIR] NODE [PASSWORD]
# DIR defaults to $MQTTFL_AUTH_DIR, else ./auth; PASSWD_FILE to DIR/passwd; CRED_DIR to DIR/credentials.
# Without PASSWORD a random one is generated. Either way the clear password is written to
# CRED_DIR/NODE.password (0600): that file goes to the node as /etc/mqttfl/credentials/NODE.password, which
# systemd hands to the agent through LoadCredential=. The broker only ever stores the hash.
# A new PASSWD_FILE is created 0600: Mosquitto reads it after dropping root, so on the broker host run
#   chown root:mosquitto PASSWD_FILE && chmod 0640 PASSWD_FILE
set -eu

dir=${MQTTFL_AUTH_DIR:-./auth}
passwd_file=""
cred_dir=""
while getopts d:p:c:h opt; do
    case $opt in
        d) dir=$OPTARG ;;
        p) passwd_file=$OPTARG ;;
        c) cred_dir=$OPTARG ;;
        *) echo "usage: $0 [-d DIR] [-p PASSWD_FILE] [-c CRED_DIR] NODE [PASSWORD]" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 [-d DIR] [-p PASSWD_FILE] [-c CRED_DIR] NODE [PASSWORD]" >&2
    exit 2
fi
node=$1
if ! printf '%s\n' "$node" | grep -Eqx '[a-z0-9][a-z0-9_.-]{0,63}'; then
    echo "$0: invalid node id '$node' (want [a-z0-9][a-z0-9_.-]{0,63})" >&2
    exit 2
fi
passwd_file=${passwd_file:-$dir/passwd}
cred_dir=${cred_dir:-$dir/credentials}

if command -v mosquitto_passwd >/dev/null 2>&1; then
    mp=mosquitto_passwd
elif [ -x /usr/bin/mosquitto_passwd ]; then
    mp=/usr/bin/mosquitto_passwd
else
    echo "$0: mosquitto_passwd not found (Debian package 'mosquitto')" >&2
    exit 1
fi

if [ $# -eq 2 ]; then
    password=$2
else
    # 32 random bytes, base64 without the characters that need quoting in TOML, shells or URLs.
    password=$(openssl rand -base64 32 | tr -d '\n/+=')
fi

umask 077
mkdir -p "$cred_dir" "$(dirname "$passwd_file")"
printf '%s' "$password" > "$cred_dir/$node.password"
if [ -f "$passwd_file" ]; then
    "$mp" -b "$passwd_file" "$node" "$password"
else
    "$mp" -c -b "$passwd_file" "$node" "$password"
fi
echo "$cred_dir/$node.password"
