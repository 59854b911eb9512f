#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in $(/bin/busybox cat /modules.order); do /bin/busybox insmod "/modules/$m" 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do /bin/busybox usleep 20000; i=$((i+1)); done
if ! /bin/busybox mount -t ext4 -o rw /dev/vda /newroot; then
  echo "avm-initramfs: cannot mount /dev/vda"; exec /bin/busybox sh
fi
# avm.net=ADDR/PREFIX,GATEWAY (QEMU user networking): configure the NIC now, so sshd is reachable
# as soon as it starts instead of after udev and a DHCP client (qemu masks systemd-networkd)
net=""
for arg in $(/bin/busybox cat /proc/cmdline); do
  case "$arg" in avm.net=*) net="${arg#avm.net=}";; esac
done
if [ -n "$net" ]; then
  dev=$(/bin/busybox ls /sys/class/net | /bin/busybox grep -v '^lo$' | /bin/busybox head -n 1)
  /bin/busybox ip link set lo up
  /bin/busybox ip link set "$dev" up
  /bin/busybox ip addr add "${net%,*}" dev "$dev"
  /bin/busybox ip route add default via "${net#*,}" && echo "avm-initramfs: $dev ${net%,*}"
fi
seed=/sys/firmware/qemu_fw_cfg/by_name/@SEED@/raw
if [ -r "$seed" ]; then
  /bin/busybox tar -x -C /newroot -f "$seed" && echo "avm-initramfs: per-VM seed installed"
else
  echo "avm-initramfs: no per-VM seed"
fi
# qemu: a throwaway host key, so sshd starts before the identity gate delivers the VM's own;
# only when the root has no host key yet (a reboot keeps the key the gate installed)
placeholder=/sys/firmware/qemu_fw_cfg/by_name/@PLACEHOLDER@/raw
if [ -r "$placeholder" ] && [ ! -e /newroot/etc/ssh/ssh_host_ed25519_key ]; then
  /bin/busybox tar -x -C /newroot -f "$placeholder" && echo "avm-initramfs: throwaway host key installed"
fi
case " $(/bin/busybox cat /proc/cmdline) " in
  *" avm.identity=gate "*)
    # warm start: the VM's identity comes from the host through the avm.identity port; the host
    # forwards no port to sshd before it has arrived
    w=/newroot/etc/systemd/system/multi-user.target.wants
    /bin/busybox mkdir -p /newroot/etc/avm /newroot/etc/ssh/sshd_config.d "$w"
    /bin/busybox cp /gate/identity_gate.py /newroot/etc/avm/identity_gate.py
    /bin/busybox cp /gate/avm-identity.service /newroot/etc/systemd/system/avm-identity.service
    /bin/busybox ln -sf /etc/systemd/system/avm-identity.service "$w/avm-identity.service"
    /bin/busybox cp /gate/sshd-avm.conf /newroot/etc/ssh/sshd_config.d/avm.conf
    /bin/busybox mkdir -p /newroot/etc/systemd/system/ssh.service.d /newroot/etc/security/limits.d
    /bin/busybox cp /gate/avm-first.conf /newroot/etc/systemd/system/ssh.service.d/avm-first.conf
    /bin/busybox cp /gate/avm-session-priority.conf /newroot/etc/security/limits.d/avm-session-priority.conf
    echo "avm-initramfs: identity gate installed";;
esac
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/init
