#!/usr/bin/env bash
# Makes the DEVELOPMENT update-signing keys of this directory: a CA (dev-ca.crt, the keyring
# of the CI image) and a signer certificate with the codeSigning extended key usage
# (dev-signer.crt, dev-signer.key), valid 20 years. The CA's key is thrown away once the
# signer is made. DEVELOPMENT ONLY, NEVER SHIP: the signer's key is public in this
# repository, so a box that trusts dev-ca.crt installs anything anybody signs with it.
# Real boxes trust the retailer's CA only (docs/OTA.md).
#
#   board/common/ota-dev/make-dev-keys.sh [DIR [LABEL]]     (default: this directory)
#
# The image test makes a second, unrelated CA the same way (to check that a bundle signed
# by it is refused): `make-dev-keys.sh DIR LABEL` with another DIR; LABEL goes into the
# certificates' names.
set -euo pipefail

dir=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
label=${2:+ ($2)}
days=7305
mkdir -p "$dir"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cat >"$tmp/openssl.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no

[dn]

[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[signer]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = critical, codeSigning
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
CNF
export OPENSSL_CONF=$tmp/openssl.cnf
org="/O=storebox development only, never ship"

openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -noenc \
    -keyout "$tmp/ca.key" -out "$dir/dev-ca.crt" -days "$days" -sha256 \
    -config "$tmp/openssl.cnf" -extensions ca -subj "$org/CN=storebox OTA development CA$label" \
    2>"$tmp/log" || { cat "$tmp/log" >&2; exit 1; }
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -noenc \
    -keyout "$dir/dev-signer.key" -out "$tmp/signer.csr" \
    -config "$tmp/openssl.cnf" -subj "$org/CN=storebox OTA development signer$label" \
    2>"$tmp/log" || { cat "$tmp/log" >&2; exit 1; }
openssl x509 -req -in "$tmp/signer.csr" -CA "$dir/dev-ca.crt" -CAkey "$tmp/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -out "$dir/dev-signer.crt" -days "$days" \
    -sha256 -extfile "$tmp/openssl.cnf" -extensions signer 2>"$tmp/log" || {
    cat "$tmp/log" >&2; exit 1; }
chmod 0644 "$dir/dev-ca.crt" "$dir/dev-signer.crt" "$dir/dev-signer.key"
openssl verify -CAfile "$dir/dev-ca.crt" "$dir/dev-signer.crt" >/dev/null
echo "make-dev-keys: $dir/dev-ca.crt, dev-signer.crt, dev-signer.key (development only, never ship)"
