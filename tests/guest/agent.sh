#!/bin/sh
# A tiny stand-in for GitHub's runner agent (busybox sh + wget), run by the runner boot script
# with the encoded JIT config the monitor served. It talks to the GitHub stand-in's agent
# endpoints (monitor/standin/), which know the runner by that config, as GitHub does:
#   1. POST /_standin/agent/online: the runner's registration goes online (Idle);
#   2. POST /_standin/agent/job every second until a job is assigned (the runner was
#      reserved for it); the stand-in marks it busy;
#   3. "run" the job (sleep for the seconds it names), POST /_standin/agent/finish: the
#      ephemeral runner's registration is removed, then power off, as an ephemeral runner does.
. /lib/guest.sh

jit=$1
if [ -z "$jit" ]; then
    say "agent: no JIT config"
    exit 1
fi

agent() {  # agent <call> <output file>: POST the JIT config to the stand-in; 0 if 2xx
    wget -q -O "$2" --post-data "$jit" "$STANDIN/_standin/agent/$1" 2> /run/agent.err
}

gone() {
    # 404: the registration is gone (the monitor removed it); nothing more to do here.
    grep -q ' 404 ' /run/agent.err
}

stop() {
    say "agent: $1; powering off"
    flush_log
    poweroff -f
}

until agent online /run/agent.json; do
    gone && stop "no registration for this JIT config"
    say "agent: stand-in not reachable at $STANDIN, retrying"
    sleep 1
done
name=$(sed -n 's/.*"name": *"\([^"]*\)".*/\1/p' /run/agent.json)
say "agent: $name is online, waiting for a job"

while :; do
    if agent job /run/job.json; then
        [ -s /run/job.json ] && break
    else
        gone && stop "registration of $name removed"
    fi
    sleep 1
done
job=$(sed -n 's/.*"id": *\([0-9]*\).*/\1/p' /run/job.json)
seconds=$(sed -n 's/.*"seconds": *\([0-9.]*\).*/\1/p' /run/job.json)
say "agent: running job $job for ${seconds:-1} s"
sleep "${seconds:-1}"
say "agent: job $job done"
flush_log
agent finish /dev/null || say "agent: finishing job $job failed: $(cat /run/agent.err)"
stop "ephemeral runner $name finished"
