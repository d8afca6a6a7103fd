#!/usr/bin/env bash
# Throwaway keys for docker/compose.yaml, so that the try-out runs as a deployment
# across organisations does: every connection TLS, and only SuperNodes whose keys
# the coordinator registered may join. Writes docker/keys/ (git ignores it):
#
#   ca.pem, ca.key               a certificate authority for this try-out only
#   superlink.pem, superlink.key the SuperLink's certificate, for the names the
#                                try-out reaches it by: "superlink" (the compose
#                                network) and 127.0.0.1 (the coordinator's CLI)
#   <partner>, <partner>.pub     each partner's SuperNode key pair (EC P-384,
#                                OpenSSH format); the coordinator registers the .pub
#
#   docker/make-keys.sh [partner ...]      (default: books games, compose.yaml's)
#
# Files that exist are kept, so running it again changes nothing. Across
# organisations, the coordinator's certificate comes from its own PKI and each
# partner makes its own key pair (ssh-keygen -t ecdsa -b 384) and sends only the
# .pub. Needs openssl and ssh-keygen.
set -euo pipefail
cd "$(dirname "$0")"
partners=("$@")
[ ${#partners[@]} -gt 0 ] || partners=(books games)
mkdir -p keys
cd keys

if [ ! -f ca.pem ]; then
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -days 30 \
        -subj "/CN=fedxrec try-out CA" -keyout ca.key -out ca.pem 2>/dev/null
    chmod 600 ca.key
fi
if [ ! -f superlink.pem ]; then
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -subj "/CN=superlink" \
        -keyout superlink.key -out superlink.csr 2>/dev/null
    openssl x509 -req -in superlink.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 30 -out superlink.pem \
        -extfile <(printf 'subjectAltName=DNS:superlink,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n') 2>/dev/null
    rm -f superlink.csr ca.srl
fi
for partner in "${partners[@]}"; do
    [ -f "$partner" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedxrec $partner" -f "$partner"
done
# The containers run as the image's user (uid 10001), not as whoever ran this, and
# read their key through a read-only bind mount: the two keys they mount must be
# readable by it. Acceptable for keys made for a try-out on one host, not beyond it.
chmod 644 superlink.key "${partners[@]}"
echo "docker/keys: CA, the SuperLink's certificate, and key pairs of ${partners[*]}"
