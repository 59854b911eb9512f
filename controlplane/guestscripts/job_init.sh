#!/.avm/bin/busybox sh
B=/.avm/bin/busybox
$B mkdir -p /proc /sys /dev /tmp /run
$B mount -t proc -o nosuid,nodev,noexec proc /proc
$B --install -s /.avm/bin
export PATH=/.avm/bin
mount -t sysfs -o nosuid,nodev,noexec sys /sys
mount -t devtmpfs -o nosuid,noexec dev /dev
# no set-id program can raise privileges anywhere in the guest (bits are also stripped on import)
mount -o remount,bind,nosuid,nodev / || echo "avm-init: remount / nosuid failed"
chmod 1777 /tmp
# the run's secret frames the result; the job never sees it (read, then removed, before it starts)
read -r S < /.avm/secret; rm -f /.avm/secret
. /.avm/limits
while read -r m; do [ -n "$m" ] && insmod "/.avm/kmod/$m.ko"; done < /.avm/modules
ip link set lo up 2>/dev/null
if [ -f /.avm/net ]; then
  . /.avm/net
  ip link set eth0 up && ip addr add "$AVM_NET_ADDR" dev eth0 && ip route add default via "$AVM_NET_GW"
fi
R=/run/avm; IO=/run/avmio
mkdir -p $R/res/out $IO /job/out; chmod 700 $R; chmod 755 $IO
chown -R 65534:65534 /job
ls /sys/class/net > $R/res/netdevs
grep ' / ' /proc/mounts > $R/res/mounts
# egress probes run as root (ICMP needs a raw socket), before the job, into the result itself
[ -f /.avm/probe.sh ] && sh /.avm/probe.sh > $R/res/probes.txt 2>&1
mkfifo $IO/o $IO/e $IO/oc $IO/ec; chown 65534:65534 $IO/o $IO/e
# each stream: a bounded copy for the result, a bounded copy for the console, the rest counted
# (dd with fullblock reads exactly the limit from the pipe: head's stdio buffer would read ahead)
keep() { dd bs=1024 count=$((AVM_STDIO_LIMIT / 1024)) iflag=fullblock of="$1" 2>/dev/null
  wc -c > "$1.rest"; }
tee $IO/oc < $IO/o | keep $R/res/stdout &
tee $IO/ec < $IO/e | keep $R/res/stderr &
{ head -c "$AVM_CONSOLE_LIMIT"; cat > /dev/null; } < $IO/oc > /dev/console &
{ head -c "$AVM_CONSOLE_LIMIT"; cat > /dev/null; } < $IO/ec > /dev/console &
echo "avm-init: job start"
setpriv --nnp su -s /.avm/bin/sh avmjob -c 'exec /.avm/bin/sh /.avm/job.sh' > $IO/o 2> $IO/e < /dev/null
rc=$?
# nothing of the job may outlive it: no process can change a file between the checks below and the tar
setpriv --nnp su -s /.avm/bin/sh avmjob -c 'kill -9 -1' 2>/dev/null
wait
echo "$rc" > $R/res/rc
cd /job/out
set --
while read -r p; do
  if [ -n "$p" ] && { [ -e "$p" ] || [ -L "$p" ]; }; then set -- "$@" "./$p"; fi
done < /.avm/outputs
# the output budget, applied as the job user (it can only shorten the job's own files)
[ $# -gt 0 ] && setpriv --nnp su -s /.avm/bin/sh avmjob -c '. /.avm/budget.sh' sh "$@" > $R/res/truncated
mount --bind /job/out $R/res/out
cd $R/res
set -- rc stdout stdout.rest stderr stderr.rest netdevs mounts
[ -f probes.txt ] && set -- "$@" probes.txt
[ -s truncated ] && set -- "$@" truncated
while read -r p; do
  if [ -n "$p" ] && { [ -e "out/$p" ] || [ -L "out/$p" ]; }; then set -- "$@" "out/$p"; fi
done < /.avm/outputs
P=
for d in /sys/class/virtio-ports/*; do [ "$(cat "$d/name" 2>/dev/null)" = avm.result ] && P=${d##*/}; done
if [ -n "$P" ]; then
  { echo "AVM-RESULT-1 $S"; tar -cf - "$@"; echo "AVM-RESULT-END $S"; } > /dev/$P
else echo "avm-init: no result port"; fi
sync
echo "avm-init: job exit $rc"
reboot -f
