#!/usr/bin/env bash
# Register SuperNodes' public keys with a SuperLink that runs with --enable-supernode-auth
# (Flower 1.42's CLI-managed SuperNode authentication: only registered keys may connect, and a
# SuperNode whose key is not registered exits with code 305).
#
#   scripts/register_supernodes.sh SUPERLINK_HOST:PORT CA_CERT [PUBLIC_KEY ...]
#
# It waits (up to 120 s) for the SuperLink's port, then runs `flwr supernode register KEY` for
# each key over TLS (CA_CERT), from a private FLWR_HOME. With no key it registers nothing and
# exits 0: SuperNode authentication is off (docker-compose.yml's insecure default).
# scripts/gen_certs.sh makes the keys (supernode-I, supernode-I.pub) beside the certificates.
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: register_supernodes.sh SUPERLINK_HOST:PORT CA_CERT [PUBLIC_KEY ...]" >&2
    exit 2
fi
SUPERLINK="$1"
CA="$2"
shift 2
if [ $# -eq 0 ]; then
    echo "register_supernodes.sh: no public key given: nothing to register (SuperNode authentication off)"
    exit 0
fi
for key in "$@"; do
    [ -f "$key" ] || { echo "register_supernodes.sh: no such public key: $key" >&2; exit 2; }
done
[ -f "$CA" ] || { echo "register_supernodes.sh: no such CA certificate: $CA" >&2; exit 2; }

home="$(mktemp -d)"
trap 'rm -rf "$home"' EXIT
cat > "$home/config.toml" <<EOF
[superlink]
default = "link"

[superlink.link]
address = "$SUPERLINK"
root-certificates = "$CA"
EOF

host="${SUPERLINK%:*}"
port="${SUPERLINK##*:}"
for _ in $(seq 240); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
        break
    fi
    sleep 0.5
done

for key in "$@"; do
    FLWR_HOME="$home" flwr supernode register "$key" link
done
echo "register_supernodes.sh: registered $# SuperNode key(s) with $SUPERLINK"
