#!/bin/sh
# Create the private CA that signs the broker's and the nodes' certificates.
#   gen-ca.sh [-d DIR] [-n NAME] [-y DAYS]
# DIR defaults to $MQTTFL_PKI_DIR, else ./pki. Writes DIR/ca.key (0600) and DIR/ca.crt.
# Refuses to overwrite an existing CA: re-running by accident would orphan every issued certificate.
set -eu

dir=${MQTTFL_PKI_DIR:-./pki}
name="mqttfl CA"
days=3650
while getopts d:n:y:h opt; do
    case $opt in
        d) dir=$OPTARG ;;
        n) name=$OPTARG ;;
        y) days=$OPTARG ;;
        *) echo "usage: $0 [-d DIR] [-n NAME] [-y DAYS]" >&2; exit 2 ;;
    esac
done

if [ -e "$dir/ca.key" ] || [ -e "$dir/ca.crt" ]; then
    echo "$0: $dir already holds a CA; remove ca.key/ca.crt first to replace it" >&2
    exit 1
fi
mkdir -p "$dir"
umask 077
# P-256 rather than RSA: fast to generate and verify on Raspberry Pi class devices, supported by
# Mosquitto/OpenSSL and Python's ssl alike.
openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ca.key"
umask 022
openssl req -x509 -new -sha256 -key "$dir/ca.key" -days "$days" -subj "/CN=$name" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$dir/ca.crt"
echo "$dir/ca.crt"
