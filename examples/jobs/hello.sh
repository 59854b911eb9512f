#!/bin/sh
# A Tier-2 demo job: runs in its own microVM, with no network unless its spec allows some.
echo "hello from a Tier-2 microVM job: $GREETING"
echo "kernel: $(uname -r), uid: $(id -u)"
if ip -o link 2>/dev/null | grep -qv ' lo:'; then echo "network interfaces: present"; else echo "network interfaces: none (default-deny egress)"; fi
mkdir -p "$AVM_OUT"
date > "$AVM_OUT/finished-at.txt"
