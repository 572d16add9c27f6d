#!/bin/sh
# Make a self-signed certificate for testing quictun-signal over wss:// locally.
#
#   certs/make-certs.sh [HOSTNAME] [OUTDIR]
#
# Writes OUTDIR/relay.key (private key, mode 600) and OUTDIR/relay.crt (certificate,
# valid 30 days, SAN = HOSTNAME, localhost, 127.0.0.1, ::1). Defaults: localhost, ./certs.
# Never commit the .key file. For deployment use a CA-issued certificate: see README.md.
set -eu

HOST="${1:-localhost}"
OUT="${2:-$(dirname "$0")}"
mkdir -p "$OUT"
umask 077

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -days 30 -subj "/CN=$HOST" \
    -addext "subjectAltName=DNS:$HOST,DNS:localhost,IP:127.0.0.1,IP:::1" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -addext "extendedKeyUsage=serverAuth" \
    -keyout "$OUT/relay.key" -out "$OUT/relay.crt"
chmod 644 "$OUT/relay.crt"

echo "wrote $OUT/relay.crt and $OUT/relay.key"
echo "run:   quictun-signal --cert $OUT/relay.crt --key $OUT/relay.key"
echo "trust: export QUICTUN_SIGNAL_CA=$OUT/relay.crt on every quictun client (it is self-signed)"
