# Shared by the e2e test guest's /init, the runner boot script and /agent.sh (busybox sh).
#
# Everything these scripts print goes, through the tee that /init starts, both to the VGA
# console (tty0, so screenshots show it) and to $LOG, which `upload_log` sends to the
# monitor's POST /boot-log in chunks: only the bytes added since the last accepted upload.
# The guest's token opens /boot-log only until the JIT config is served (then a job's code
# could use it), so the runner boot script flushes the log before it asks for the config, and
# uploading stops at the first 410.

LOG=/run/boot.log
# Written by /init once it has a lease: IP, ROUTER, MONITOR and STANDIN (base URLs), and
# GUEST_TOKEN, this guest's own token for the monitor (empty in address-only mode).
[ -f /run/guest.env ] && . /run/guest.env

say() {
    echo "$*"
}

# wget from the monitor, showing this guest's token when it has one.
monitor_wget() {
    if [ -n "$GUEST_TOKEN" ]; then
        wget --header "Authorization: Bearer $GUEST_TOKEN" "$@"
    else
        wget "$@"
    fi
}

# Largest chunk sent at once (the monitor keeps at most 1 MiB per runner).
CHUNK_BYTES=65536

upload_log() {
    # One uploader at a time (the background loop and a final flush): mkdir is atomic.
    mkdir /run/log.lock 2>/dev/null || return 1
    sent=$(cat /run/log.sent 2>/dev/null || echo 0)
    size=$(wc -c < "$LOG")
    if [ -z "$MONITOR" ] || [ -e /run/log.refused ] || [ "$size" -le "$sent" ]; then
        rmdir /run/log.lock
        return 0
    fi
    count=$((size - sent))
    [ "$count" -gt "$CHUNK_BYTES" ] && count=$CHUNK_BYTES
    tail -c +$((sent + 1)) "$LOG" | head -c "$count" > /run/log.chunk
    if monitor_wget -q -O /dev/null --post-file /run/log.chunk "$MONITOR/boot-log" 2>/run/log.err; then
        echo $((sent + count)) > /run/log.sent
    elif grep -q -e ' 413 ' -e ' 410 ' /run/log.err; then
        # Over the monitor's cap, or the token is spent: sending more would only be refused.
        touch /run/log.refused
    fi
    rmdir /run/log.lock
    return 0
}

upload_log_forever() {
    while :; do
        upload_log
        sleep 1
    done
}

flush_log() {
    # What was just printed is still on its way through /init's tee: give it a moment.
    sleep 0.3
    # Wait for a running upload to finish, then send the rest (a few tries, then give up).
    for attempt in 1 2 3 4 5 6 7 8 9 10; do
        [ -e /run/log.refused ] && return 1
        if upload_log; then
            [ "$(cat /run/log.sent 2>/dev/null || echo 0)" -ge "$(wc -c < "$LOG")" ] && return 0
        fi
        sleep 0.3
    done
    return 1
}
