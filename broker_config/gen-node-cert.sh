#!/bin/sh
# Issue a key and certificate for one node (or for the broker), signed by the CA of gen-ca.sh.
#   gen-node-cert.sh [-d DIR] [-s SAN] [-y DAYS] NODE
# DIR defaults to $MQTTFL_PKI_DIR, else ./pki; writes DIR/NODE.key (0600) and DIR/NODE.crt with CN=NODE.
# SAN (e.g. "DNS:broker.example.org,IP:10.0.0.5") is needed on the broker's certificate, since clients
# verify the host name against it; for a broker used from loopback: -s IP:127.0.0.1,DNS:localhost.
# With require_certificate + use_identity_as_username in the broker, the CN is the MQTT username, so it
# must equal the node id.
set -eu

dir=${MQTTFL_PKI_DIR:-./pki}
san=""
days=825
while getopts d:s:y:h opt; do
    case $opt in
        d) dir=$OPTARG ;;
        s) san=$OPTARG ;;
        y) days=$OPTARG ;;
        *) echo "usage: $0 [-d DIR] [-s SAN] [-y DAYS] NODE" >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ $# -ne 1 ]; then
    echo "usage: $0 [-d DIR] [-s SAN] [-y DAYS] NODE" >&2
    exit 2
fi
node=$1
# Node ids are topic levels (docs/design.md, "Topics"); the check also keeps the name out of openssl's -subj syntax.
if ! printf '%s\n' "$node" | grep -Eqx '[a-z0-9][a-z0-9_.-]{0,63}'; then
    echo "$0: invalid node id '$node' (want [a-z0-9][a-z0-9_.-]{0,63})" >&2
    exit 2
fi
if [ ! -f "$dir/ca.key" ] || [ ! -f "$dir/ca.crt" ]; then
    echo "$0: no CA in $dir; run gen-ca.sh first" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
umask 077
openssl ecparam -name prime256v1 -genkey -noout -out "$dir/$node.key"
umask 022
openssl req -new -sha256 -key "$dir/$node.key" -subj "/CN=$node" -out "$tmp/req.csr"
{
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    # Both: the same certificate may serve a site broker (server) that bridges out as a client.
    echo "extendedKeyUsage=serverAuth,clientAuth"
    echo "subjectKeyIdentifier=hash"
    echo "authorityKeyIdentifier=keyid"
    if [ -n "$san" ]; then
        echo "subjectAltName=$san"
    fi
} > "$tmp/ext.cnf"
# A random serial (rather than a ca.srl counter file) lets several operators issue from copies of the CA.
openssl x509 -req -sha256 -in "$tmp/req.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -extfile "$tmp/ext.cnf" -out "$dir/$node.crt" 2>/dev/null
echo "$dir/$node.crt"
