#!/bin/sh
# Makes the TLS tests' certificates in directory $1 (never checked in): a CA, a server
# certificate for 127.0.0.1 and localhost, one already expired, two client certificates
# (client1, client2) and a second, unrelated CA with a server certificate of its own.
set -e
cd "$1"
q() { "$@" >/dev/null 2>&1; }
key() { q openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out "$1"; }
key ca.key
q openssl req -x509 -new -key ca.key -out ca.pem -days 3 -subj /CN=pconn-test-ca
key other-ca.key
q openssl req -x509 -new -key other-ca.key -out other-ca.pem -days 3 -subj /CN=other-ca
# A minimal CA for `openssl ca`, which alone sets arbitrary validity dates.
mkdir -p db && : > db/index && echo 1000 > db/serial
cat > ca.cnf <<CNF
[ca]
default_ca = test
[test]
dir = .
database = db/index
serial = db/serial
new_certs_dir = db
default_md = sha256
policy = any
copy_extensions = copy
unique_subject = no
[any]
commonName = supplied
CNF
# name, subject, SAN, issuer prefix, and either -days N or -startdate A -enddate B
cert() {
    name=$1 subj=$2 san=$3 issuer=$4; shift 4
    key "$name.key"
    q openssl req -new -key "$name.key" -out "$name.csr" -subj "$subj" -addext "subjectAltName=$san"
    q openssl ca -batch -config ca.cnf -cert "$issuer.pem" -keyfile "$issuer.key" -in "$name.csr" \
        -out "$name.pem" -notext "$@"
}
cert server /CN=pconn-test-server "IP:127.0.0.1,DNS:localhost" ca -days 2
cert expired /CN=pconn-test-server "IP:127.0.0.1,DNS:localhost" ca -startdate 20200101000000Z -enddate 20200102000000Z
cert client1 /CN=client1 "DNS:client1.example,URI:spiffe://test/client1" ca -days 2
cert client2 /CN=client2 "DNS:client2.example" ca -days 2
cert stranger /CN=pconn-test-server "IP:127.0.0.1" other-ca -days 2
