#!/usr/bin/env bash
# Make a throw-away CA and a SuperLink server certificate for TLS between the SuperLink, the
# SuperNodes and the Flower CLI (flwr run / ls / stop), and one SuperNode authentication key
# pair per SuperNode (EC P-384 in OpenSSH format, made with ssh-keygen as Flower's docs do):
# supernode-I and supernode-I.pub for I in 0..SUPERNODES-1 (SUPERNODES defaults to 3, the
# compose file's SuperNodes).
#
#   scripts/gen_certs.sh [OUT_DIR] [EXTRA_SAN ...]     (OUT_DIR defaults to ./certs)
#
# Writes OUT_DIR/ca.crt, ca.key, server.pem, server.key, the SuperNode keys, and OUT_DIR/tls.env,
# an env file for `docker compose --env-file certs/tls.env up ...` that switches every service of
# docker-compose.yml from --insecure to these certificates and turns on SuperNode
# authentication (the SuperLink's --enable-supernode-auth, each SuperNode's private key, and
# the keys the register job registers). The server certificate's SANs:
# DNS superlink, DNS localhost, IP 127.0.0.1, plus any EXTRA_SAN given ("DNS:host" or
# "IP:10.0.0.5"). Keys are for testing; a real deployment uses its own PKI.
set -euo pipefail

OUT="${1:-certs}"
shift || true
command -v openssl >/dev/null || { echo "gen_certs.sh: openssl not found" >&2; exit 2; }
command -v ssh-keygen >/dev/null || { echo "gen_certs.sh: ssh-keygen not found (openssh-client)" >&2; exit 2; }
NODES="${SUPERNODES:-3}"
mkdir -p "$OUT"
cd "$OUT"

SANS="DNS:superlink,DNS:localhost,IP:127.0.0.1"
for extra in "$@"; do SANS="$SANS,$extra"; done

openssl genrsa -out ca.key 2048 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days 365 -subj "/CN=fl-privacy-testbed CA" -out ca.crt

openssl genrsa -out server.key 2048 2>/dev/null
openssl req -new -key server.key -subj "/CN=superlink" -out server.csr
cat > server.ext <<EXT
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $SANS
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
    -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key
# Containers run the Flower processes as an unprivileged user: the server key must be readable.
chmod 644 server.key

KEYS=""
for i in $(seq 0 $((NODES - 1))); do
    rm -f "supernode-$i" "supernode-$i.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "supernode-$i"
    chmod 644 "supernode-$i"  # test keys, read by the containers' unprivileged user
    KEYS="$KEYS${KEYS:+ }/certs/supernode-$i.pub"
done

# Paths as the containers of docker-compose.yml see them (./certs is mounted at /certs).
{
    echo "SUPERLINK_SECURITY=--ssl-ca-certfile /certs/ca.crt --ssl-certfile /certs/server.pem --ssl-keyfile /certs/server.key --enable-supernode-auth"
    echo "SUPERNODE_SECURITY=--root-certificates /certs/ca.crt"
    for i in $(seq 0 $((NODES - 1))); do
        echo "SUPERNODE_${i}_AUTH=--auth-supernode-private-key /certs/supernode-$i"
    done
    echo "SUPERNODE_KEYS=$KEYS"
    echo "SUBMIT_SECURITY=--tls --certs /certs"
} > tls.env
echo "gen_certs.sh: wrote $(pwd)/{ca.crt,ca.key,server.pem,server.key,supernode-0..$((NODES - 1))[.pub],tls.env} (SANs: $SANS)"
